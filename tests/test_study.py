"""Study files: the parser (good and bad files), the cross product, rows and overrides."""

from __future__ import annotations

import pytest

from knormctl.errors import UsageError
from knormctl.study import load_study, parse_study

GOOD = '''\
name = "budgets"
description = "two budgets, two skip sets, prefill and decode"
model = "smollm2-135m"
presses = ["knorm", "streaming"]
keep_ratios = [0.9, 0.5]
prune_after = [256, 1024]
skip_layers = [[0], []]
compress_mode = "prefill"
num_wikitext_samples = 2
num_pg19_samples = 0
'''


def test_lists_of_scalar_options_and_lists_of_lists_are_axes():
    study = parse_study(GOOD)
    assert study.name == "budgets"
    assert study.axes == ["prune_after", "skip_layers"]
    assert len(study.runs) == 4
    combos = {(r.config.prune_after, tuple(r.config.skip_layers)) for r in study.runs}
    assert combos == {(256, (0,)), (256, ()), (1024, (0,)), (1024, ())}
    for r in study.runs:
        # presses and keep_ratios are lists inside one run, not axes
        assert r.config.presses == ["knorm", "streaming"] and r.config.keep_ratios == [0.9, 0.5]
        assert r.config.group == "budgets" and r.config.compress_mode == "prefill"
        assert r.config.study["name"] == "budgets" and r.config.study["index"] == r.index
        assert r.varying == {"prune_after": r.config.prune_after, "skip_layers": r.config.skip_layers}
    assert len({r.key for r in study.runs}) == 4


def test_an_empty_skip_layers_is_the_runs_value_not_an_axis_of_nothing():
    """skip_layers = [] (sweep's --skip-layers none): every layer compressed, one run -- it used
    to be refused as an empty list, or, as a flat list, to plan zero runs."""
    study = parse_study('skip_layers = []\nnum_wikitext_samples = 1\n')
    assert [r.config.skip_layers for r in study.runs] == [[]]
    from knormctl.study import plan_study

    overridden = plan_study({}, overrides={"skip_layers": []})
    assert [r.config.skip_layers for r in overridden.runs] == [[]]


def test_runs_of_one_model_are_planned_back_to_back():
    study = parse_study('model = ["b-model", "a-model"]\ndtype = ["float32", "bfloat16"]\n')
    assert [(r.config.model, r.config.dtype) for r in study.runs] == [
        ("a-model", "bfloat16"), ("a-model", "float32"), ("b-model", "bfloat16"), ("b-model", "float32")]


def test_rows_override_the_top_level_and_may_hold_axes():
    text = GOOD.replace("prune_after = [256, 1024]\n", "") + '''
[[rows]]
compress_mode = "decode"
prune_after = 128

[[rows]]
compress_mode = "prefill"
dtype = ["float32", "bfloat16"]
'''
    study = parse_study(text)
    settings = sorted((r.config.compress_mode, r.config.prune_after, r.config.dtype, tuple(r.config.skip_layers))
                      for r in study.runs)
    assert settings == sorted([("decode", 128, "float32", (0,)), ("decode", 128, "float32", ()),
                               ("prefill", 512, "float32", (0,)), ("prefill", 512, "float32", ()),
                               ("prefill", 512, "bfloat16", (0,)), ("prefill", 512, "bfloat16", ())])

    # a row that leaves an axis out runs at the option's default, and says so (not None)
    decode = [r for r in study.runs if r.config.compress_mode == "decode"]
    assert {r.varying["dtype"] for r in decode} == {"float32"}
    assert all(None not in r.varying.values() for r in study.runs)


def test_command_line_overrides_replace_the_whole_key():
    study = parse_study(GOOD, overrides={"prune_after": 64, "keep_ratios": [0.3]})
    assert {r.config.prune_after for r in study.runs} == {64}
    assert len(study.runs) == 2 and study.axes == ["skip_layers"]
    assert all(r.config.keep_ratios == [0.3] for r in study.runs)
    assert study.resolved["overrides"] == {"prune_after": 64, "keep_ratios": [0.3]}


def test_the_file_name_is_the_default_study_name(tmp_path):
    path = tmp_path / "my-study.toml"
    path.write_text('model = "smollm2-135m"\n')
    assert load_study(path).name == "my-study"


@pytest.mark.parametrize("text, key, line, fragment", [
    ('model = "m"\nmodle = "x"\n', "modle", 2, "unknown key (did you mean 'model'?)"),
    ('\n\nprune_after = "a lot"\n', "prune_after", 3, "expected integer"),
    ('keep_ratios = []\n', "keep_ratios", 1, "empty list"),
    ('dtype = []\n', "dtype", 1, "empty list"),
    ('dtype = ["float32", "float32"]\n', "dtype", 1, "duplicate values"),
    ('prune_after = [1, 2.5]\n', "prune_after", 1, "expected integer, got 2.5"),
    ('presses = "knorm"\n', "presses", 1, "expected a list of strings"),
    ('model = "m"\n\n[[rows]]\nseed = 1\n\n[[rows]]\nmodel = 3\n', "model", 7, "expected string"),
    ('keep_ratios = [2.0]\n', "keep_ratios", 1, "is outside (0, 1]"),
    ('dtype = "float64"\n', "dtype", 1, "dtype"),
    ('[sweep]\nmodel = "m"\n', "sweep", 1, "unknown key"),
    # how to run, not what: it suggested 'presses' for resume
    ('model = "m"\nresume = 3\n', "resume", 2, "--resume is given on the command line, not in a study file"),
    ('dry_run = true\n', "dry_run", 1, "--dry-run is given on the command line"),
    ('model = "m"\nshard = "1/2"\n', "shard", 2, "a study runs on one machine"),
    # a run's own lists: a duplicate planned fine and failed the run halfway (UNIQUE constraint)
    ('model = "m"\nkeep_ratios = [0.5, 0.5]\n', "keep_ratios", 2, "duplicate values"),
    ('\nneedle_depths = [0.5, 0.5]\ntask = "niah"\n', "needle_depths", 2, "duplicate values"),
    # what every run sweeps side by side cannot be split into runs (the report merged them)
    ('presses = [["knorm"], ["streaming"]]\n', "presses", 1, "every run measures its presses side by side"),
    ('keep_ratios = [[0.9], [0.5]]\n', "keep_ratios", 1, "every run measures its keep ratios side by side"),
    # one quality measure per study: lm rows had no accuracy and dropped out of every view
    ('model = "m"\ntask = ["lm", "passkey"]\n', "task", 2, "perplexity"),
    # runs are not told apart by threads: it said "runs 1 and 2 are identical ... remove the duplicate row"
    ('threads = [1, 2]\n', "threads", 1, "cannot vary between a study's runs"),
    # the same through [[rows]]: each row flat, the runs set apart all the same
    ('model = "m"\n[[rows]]\npresses = ["knorm"]\n[[rows]]\npresses = ["streaming"]\n', "presses", None,
     "every run measures its presses side by side"),
    ('model = "m"\n[[rows]]\nthreads = 1\n[[rows]]\nthreads = 2\n', "threads", None,
     "cannot vary between a study's runs"),
    # the key the message opens with, not the first setting it happens to name
    ('wikitext_prompt_tokens = 256\nmax_new_tokens = 8\ncontext_lengths = [4096]\n', "context_lengths", 3,
     "--context-lengths applies to"),
    ('task = "ruler"\nsubtasks = ["vt", "bogus"]\n', "subtasks", 2, "unknown ruler subtask"),
    # refused when its run started, after the study's first run was measured and stored
    ('keep_recent = [0, 200]\ncompress_mode = "prefill"\nprune_after = 0\nkeep_ratios = [0.5]\n'
     'wikitext_prompt_tokens = 256\nnum_pg19_samples = 0\n', "keep_recent", 1,
     "--keep-recent 200 covers the whole budget of knorm keep 0.5 (128 of 256 entries kept per cut)"),
    # as sweep refuses it: the passkey run's stored config said num_wikitext_samples 3, read by nobody
    ('task = "passkey"\nnum_wikitext_samples = 3\n', "num_wikitext_samples", 2,
     "--num-wikitext-samples applies to --task lm, not passkey"),
    ('task = ["ruler", "passkey"]\n[[rows]]\nneedle_depths = [0.5]\n', "needle_depths", 3,
     "--needle-depths applies to --task niah, not passkey, ruler"),
    # a row that sets it for none of its runs, though another row's runs read it
    ('model = "m"\n[[rows]]\ntask = "niah"\n[[rows]]\ntask = "passkey"\nneedle_depths = [0.5]\n', "needle_depths",
     6, "--needle-depths applies to --task niah, not passkey"),
])
def test_bad_files_fail_with_the_key_and_its_line(text, key, line, fragment):
    with pytest.raises(UsageError) as err:
        parse_study(text, path="s.toml")
    msg = str(err.value)
    assert (f"s.toml, line {line}: {key}:" if line else f"s.toml: {key}:") in msg, msg
    assert fragment in msg, msg
    assert "\n" not in msg


def test_not_toml_and_missing_files_are_one_line(tmp_path):
    with pytest.raises(UsageError, match=r"s.toml: not valid TOML"):
        parse_study('model = "unclosed\n', path="s.toml")
    with pytest.raises(UsageError, match="no such file"):
        load_study(tmp_path / "nope.toml")
    with pytest.raises(UsageError, match="is a folder"):
        load_study(tmp_path)


def test_question_tasks_default_to_prefill_mode_in_a_study_as_on_the_command_line():
    """sweep --task passkey compresses the context once (prefill); the same task in a study file
    ran in decode mode, another experiment, and refused prefill-only presses."""
    study = parse_study('task = ["ruler", "passkey"]\npresses = ["pyramidkv"]\n')
    assert {r.config.compress_mode for r in study.runs} == {"prefill"}
    assert parse_study('num_wikitext_samples = 1\n').runs[0].config.compress_mode == "decode"
    assert parse_study('task = "passkey"\ncompress_mode = "decode"\n').runs[0].config.compress_mode == "decode"


def test_a_study_stored_before_prefill_became_the_question_tasks_default_continues_as_it_ran():
    """Its stored runs' keys say decode: planned again under the new default they matched nothing,
    and the group was refused as 'not part of this study'."""
    from knormctl.study import study_from_stored

    now = parse_study('task = "passkey"\nprune_after = [0, 64]\n')
    old = {k: v for k, v in now.resolved.items() if k not in ("plan", "key_ids")}  # as stored before
    again = study_from_stored(old)
    assert {r.config.compress_mode for r in again.runs} == {"decode"}
    assert {r.config.compress_mode for r in study_from_stored(now.resolved).runs} == {"prefill"}


def test_identical_runs_are_refused():
    with pytest.raises(UsageError, match="identical"):
        parse_study('[[rows]]\nseed = 1\n\n[[rows]]\nseed = 1\n')


def test_an_option_only_some_runs_tasks_read_is_left_out_of_the_others():
    """task = ["passkey", "niah"] with two needle depth lists: the passkey runs stored a
    needle_depths they never read (two identical passkey runs, told apart by it)."""
    study = parse_study('task = ["passkey", "niah"]\nneedle_depths = [[0.1], [0.5]]\nsamples_per_task = 2\n')
    passkey = [r for r in study.runs if r.config.task == "passkey"]
    niah = [r for r in study.runs if r.config.task == "niah"]
    assert len(passkey) == 1 and len(niah) == 2
    from knormctl.config import RunConfig

    assert passkey[0].config.needle_depths == RunConfig().needle_depths  # the default: not the file's
    assert passkey[0].config.samples_per_task == RunConfig().samples_per_task
    assert passkey[0].varying == {"task": "passkey"}
    assert sorted(r.config.needle_depths for r in niah) == [[0.1], [0.5]]
    assert {r.config.samples_per_task for r in niah} == {2}
    assert study.axes == ["task", "needle_depths"]  # samples_per_task is the same for every run reading it
    # context lengths are ruler's and niah's, the passkey run's are its passkey_lengths: it was refused
    mixed = parse_study('task = ["passkey", "ruler"]\ncontext_lengths = [4096]\npasskey_lengths = [512]\n')
    assert {r.config.task: (r.config.context_lengths, r.config.passkey_lengths) for r in mixed.runs} == {
        "passkey": (None, [512]), "ruler": ([4096], RunConfig().passkey_lengths)}
    assert mixed.axes == ["task"]


def test_a_command_line_option_wrong_for_itself_names_no_run_but_one_wrong_for_a_run_does():
    """--keep-ratios 90 ended '(run 1: dtype=bfloat16)' though it is wrong for every run; a
    refusal that comes from a run's own settings still names the run."""
    with pytest.raises(UsageError) as err:
        parse_study('dtype = ["float32", "bfloat16"]\n', path="s.toml", overrides={"keep_ratios": [90.0]})
    assert str(err.value) == ("--keep-ratios: 90 is outside (0, 1] (the fraction of the cache kept); use 0.9 "
                              "for 90 %")
    with pytest.raises(UsageError) as err:
        parse_study('compress_mode = ["prefill", "decode"]\n', path="s.toml", overrides={"presses": ["pyramidkv"]})
    assert str(err.value).endswith("(run 2: compress_mode=decode)"), str(err.value)
