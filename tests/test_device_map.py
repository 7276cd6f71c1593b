"""``--device-map``: a model placed by accelerate over several devices (issue 16 item 4).

This machine has one device (the CPU), so a model cannot be split over two GPUs here. What
runs here: a model whose layers accelerate places with its hooks -- one layer offloaded to
disk (its weights on the ``meta`` device, loaded onto the CPU per forward) -- must give the
same tokens and the same kept entries as the plain model, for presses that score keys alone
and for presses that observe queries through hooks of their own. The split over several GPUs
(each layer's cache and cut on its own GPU, the cut grouped by device) is checked by
tests/test_cuda.py where two GPUs are present.
"""

from __future__ import annotations

import json
import sqlite3

import pytest
import torch
from typer.testing import CliRunner

from knormctl.cli import app
from knormctl.config import PressConfig
from knormctl.engine.kvcache import new_cache
from knormctl.engine.loop import run_generation
from knormctl.engine.models import load_model, mapped_devices
from knormctl.engine.timing import model_device, model_devices

runner = CliRunner()

PRESSES = [
    PressConfig(press="none"),
    PressConfig(press="knorm", keep_ratio=0.5, mode="prefill", prune_after=0, skip_layers=()),
    PressConfig(press="knorm", keep_ratio=0.7, mode="decode", prune_after=32, skip_layers=(0,)),
    PressConfig(press="snapkv", keep_ratio=0.5, mode="prefill", prune_after=0, skip_layers=()),
    PressConfig(press="adakv", keep_ratio=0.5, mode="prefill", prune_after=0, skip_layers=()),
    # reads the output projection's weights outside a forward: on the meta device when offloaded
    PressConfig(press="criticalkv", keep_ratio=0.5, mode="prefill", prune_after=0, skip_layers=()),
]


@pytest.fixture(scope="module")
def offloaded(tiny_llama_dir, tmp_path_factory):
    """(plain model, the same weights with layer 1 offloaded to disk through accelerate's hooks)."""
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    placed = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
              "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    mapped = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, device_map=placed,
                                                  offload_folder=str(tmp_path_factory.mktemp("offload"))).eval()
    return plain, mapped


def test_offloaded_layer_is_really_placed_by_accelerate(offloaded):
    _, mapped = offloaded
    assert any(p.device.type == "meta" for p in mapped.model.layers[1].parameters())
    assert hasattr(mapped.model.layers[1], "_hf_hook")  # accelerate moves its weights in per forward
    # the engine's view: the offloaded weights are not a device to synchronise or measure
    assert model_devices(mapped) == [torch.device("cpu")]
    assert model_device(mapped) == torch.device("cpu")
    assert mapped_devices(mapped) == "cpu+disk"


@pytest.mark.parametrize("pc", PRESSES, ids=lambda pc: pc.key)
def test_mapped_model_gives_the_plain_models_tokens_and_kept_entries(offloaded, pc):
    plain, mapped = offloaded
    pc = pc.validate()
    ids = torch.randint(0, plain.config.vocab_size, (1, 120), generator=torch.Generator().manual_seed(3))
    a = run_generation(plain, ids, pc, 12)
    b = run_generation(mapped, ids, pc, 12)
    assert a.token_ids == b.token_ids
    assert (a.kv_entries_peak, a.kv_entries_final, a.compress_events) == \
        (b.kv_entries_peak, b.kv_entries_final, b.compress_events)
    if not pc.is_baseline:
        assert a.kv_entries_final < a.kv_entries_peak  # the press did cut: the equality is not vacuous


def test_sampling_on_a_mapped_model_is_seeded_like_the_plain_one(offloaded):
    plain, mapped = offloaded
    pc = PressConfig(press="knorm", keep_ratio=0.5, mode="prefill", prune_after=0, skip_layers=()).validate()
    ids = torch.randint(0, plain.config.vocab_size, (1, 80), generator=torch.Generator().manual_seed(4))
    a = run_generation(plain, ids, pc, 10, sampling=True, temperature=1.5, seed=11)
    b = run_generation(mapped, ids, pc, 10, sampling=True, temperature=1.5, seed=11)
    c = run_generation(mapped, ids, pc, 10, sampling=True, temperature=1.5, seed=12)
    assert a.token_ids == b.token_ids and b.token_ids != c.token_ids


def test_cache_layers_sit_where_their_layers_run(offloaded):
    """Each cache layer is allocated from the keys its attention layer produced: on the device
    that layer runs on (the CPU here, the offloaded layer included)."""
    from knormctl.engine.kvcache import cache_kwargs

    _, mapped = offloaded
    cache = new_cache(mapped, capacity=20)
    with torch.inference_mode():
        mapped(input_ids=torch.arange(10).view(1, -1), position_ids=torch.arange(10).view(1, -1),
               **cache_kwargs(mapped, cache))
    assert [layer.keys.device.type for layer in cache.layers] == ["cpu", "cpu"]
    assert [layer.capacity for layer in cache.layers] == [20, 20]


def test_load_model_with_device_map_auto(tiny_llama_dir):
    """With only a CPU, accelerate's "auto" puts every layer on it (transformers then sets no
    hf_device_map): the run must still work and say where it ran."""
    lm = load_model(str(tiny_llama_dir), device_map="auto")
    assert lm.device == "cpu" and lm.device_map == "auto"
    plain = load_model(str(tiny_llama_dir), device="cpu")
    pc = PRESSES[1].validate()
    ids = list(range(3, 90))
    assert run_generation(lm.model, ids, pc, 8).token_ids == run_generation(plain.model, ids, pc, 8).token_ids


def test_sweep_with_device_map_stores_the_devices(tiny_llama_dir, books_dir, tmp_path):
    db = tmp_path / "r.db"
    res = runner.invoke(app, ["sweep", "--device-map", "auto", "--keep-ratios", "0.5", "--prune-after", "16",
                              "--model", str(tiny_llama_dir), "--wikitext-source", f"text:{books_dir}",
                              "--num-wikitext-samples", "1", "--num-pg19-samples", "0",
                              "--wikitext-prompt-tokens", "48", "--max-new-tokens", "4", "--eval-tokens", "0",
                              "--no-warmup", "--db", str(db), "--json"])
    assert res.exit_code == 0, res.output
    run_id = json.loads(res.stdout)["run_id"]
    con = sqlite3.connect(db)
    device, cfg = con.execute("SELECT device, config_json FROM runs WHERE id=?", (run_id,)).fetchone()
    assert device == "cpu" and json.loads(cfg)["device_map"] == "auto"
    assert con.execute("SELECT COUNT(*) FROM samples WHERE run_id=? AND error IS NULL", (run_id,)).fetchone()[0] == 2


@pytest.mark.parametrize("args, message", [
    (["--device-map", "everywhere"], "--device-map: unknown strategy 'everywhere'"),
    (["--device-map", "auto", "--device", "cpu"], "--device-map auto places the model on the devices itself"),
])
def test_bad_device_map_is_one_line_exit_2(args, message, tmp_path):
    res = runner.invoke(app, ["sweep", *args, "--db", str(tmp_path / "r.db")])
    assert res.exit_code == 2
    assert message in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert not (tmp_path / "r.db").exists()
