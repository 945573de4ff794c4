"""The one writer and reader of MiniGLM checkpoints.

    from checkpoint import load, save
    model, ckpt = load("out-sft")                 # an out_dir or a .pt file; eval mode, float32, cpu
    save(out_dir, state, best=True)               # train.py: ckpt_last.pt, and ckpt.pt when best
    model, ckpt = load("out-lora", lora_base="")  # a LoRA checkpoint: its base + adapter, merged (lora.py)

An out_dir holds two files: ckpt.pt, the state with the best val loss (what sample.py,
evaluations.py and the web app load), and ckpt_last.pt, the latest state (what
train.py --init_from=resume continues). Each is a dict written with torch.save and read with
torch.load(weights_only=True), so loading never runs code from the file:

    format         1 (TRAINING_FORMAT), 2 (int8), 3 (LoRA); files written before the field existed are format 0
    model          the weights (state_dict; a torch.compile prefix "_orig_mod." is dropped on load); in
                   a LoRA checkpoint only the trained tensors (the adapters, the embedding if trained)
    lora           a LoRA run's settings and its base: {"rank", "alpha", "dropout", "targets",
                   "train_embeddings", "base": {"path", "sha256"}} (lora.py); loading reads the base
                   (checked by sha256; --lora_base names one that moved) and merges the adapter into it
    precision      "int8" in a checkpoint sample.py --save_quantized wrote (format 2): the weights are
                   int8 with a scale per row (quant.py); absent (float32) in a training checkpoint
    model_args     the GPTConfig fields: the model is rebuilt from them, never from flags
    config         the training run's whole config (configurator's dict)
    data_meta      the data's meta.json: tokenizer (its record whole, a trained one with its ranks:
                   tokenizer(ckpt) rebuilds it, no file needed), kind (pretrain/sft), sft_template, ...
    iter_num, best_val_loss
    optimizer, rng, scaler    for resume only (AdamW moments, RNG states per process, GradScaler)

Every failure is a FileNotFoundError or a ValueError whose message names the file and says what
is wrong: missing, partial (an interrupted copy), foreign (not ours), written by a newer
MiniGLM, a damaged tokenizer record, or weights that do not fit the model_args.
"""
import os
import pickle
import shutil
from pathlib import Path

import torch

import lora
import quant
from data.records import atomic_path
from data.tokenizer import Tokenizer, tokenizer_of
from model import GPT, GPTConfig

FORMAT_VERSION = 3  # the newest format this code reads; 2: int8 weights (save_quantized), 3: LoRA
TRAINING_FORMAT = 1  # what save writes: training checkpoints did not change, older code still reads them
INT8_FORMAT = 2  # what save_standalone writes for int8 weights
LORA_FORMAT = 3  # what save writes for a LoRA run: older code refuses it by its format, not by a missing key
BEST, LAST = "ckpt.pt", "ckpt_last.pt"
REQUIRED = ("model", "model_args", "data_meta", "config")


def checkpoint_file(path, name: str = BEST) -> Path:
    """path/name for an out_dir (or a path that does not exist and has no .pt suffix), else path."""
    path = Path(path)
    return path / name if path.is_dir() or (path.suffix != ".pt" and not path.exists()) else path


def save(out_dir, state: dict, best: bool) -> None:
    """Write state to out_dir/ckpt_last.pt, and to ckpt.pt too when best (a hard link to the same
    bytes, a copy where links are not supported). Atomic: a kill mid-save changes neither file."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    last, best_path = out / LAST, out / BEST
    with atomic_path(last) as tmp:
        torch.save({**state, "format": LORA_FORMAT if "lora" in state else TRAINING_FORMAT}, tmp)
    if best:
        with atomic_path(best_path) as tmp:
            try:
                os.link(last, tmp)
            except OSError:
                shutil.copyfile(last, tmp)


def save_standalone(ckpt: dict, model: GPT, path, int8: bool) -> Path:
    """Write model with ckpt's metadata to path (a .pt file, or an out_dir: its ckpt.pt), atomically;
    no optimizer state, so it cannot be resumed. The file. model is the one load() built: a LoRA
    checkpoint's comes merged (sample.py --merge_to: a checkpoint that needs no base and that
    train.py can start from); int8=True for the model quantize_int8 made (sample.py --save_quantized)."""
    path = checkpoint_file(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    keep = ("model_args", "config", "data_meta", "iter_num", "best_val_loss")
    state = {k: ckpt[k] for k in keep if k in ckpt} | {"model": model.state_dict()} | (
        {"precision": "int8", "format": INT8_FORMAT} if int8 else {"format": TRAINING_FORMAT})
    if "lora" in ckpt:  # where the merged weights came from (the model card, a reader)
        state["merged_lora"] = ckpt["lora"]
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return path


def read(path, device: str = "cpu", mmap: bool = False) -> dict:
    """The checkpoint dict (tensors on device), checked: ours, a format this code reads, a
    tokenizer record that rebuilds (tokenizer_of) and an embedding with a row for each of its ids.
    mmap=True reads lazily (cheap when only the metadata is wanted)."""
    path = checkpoint_file(path)
    if not path.exists():
        where = "" if path.is_absolute() else f" (relative to {Path.cwd()})"
        raise FileNotFoundError(f"{path}: no checkpoint here{where}; train one first "
                                "(python train.py config/train_cpu.py) or pass the right --out_dir")
    with open(path, "rb") as f:
        zipped = f.read(4) == b"PK\x03\x04"  # torch.save writes a zip archive
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True, mmap=mmap)
    except (RuntimeError, EOFError, pickle.UnpicklingError, ValueError, OSError) as e:
        if not zipped:
            why = "not a MiniGLM checkpoint (not a torch.save zip archive)"
        elif isinstance(e, pickle.UnpicklingError):  # weights_only refused an object: code could run
            why = "not a MiniGLM checkpoint (it holds Python objects MiniGLM never writes; not loaded)"
        else:
            why = "partial or damaged (an interrupted save, copy or download?)"
        raise ValueError(f"{path}: cannot read it: {why}; {type(e).__name__}: {str(e).splitlines()[0][:200]}") from e
    # each is a dict (the weights a state_dict); one of another type is as good as missing
    missing = [k for k in REQUIRED if not isinstance(ckpt.get(k), dict)] if isinstance(ckpt, dict) else list(REQUIRED)
    if missing:
        raise ValueError(f"{path}: not a MiniGLM checkpoint (missing {', '.join(missing)})")
    version = ckpt.get("format", 0)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(f"{path}: checkpoint format {version!r} is newer than this code reads "
                         f"({FORMAT_VERSION}); update MiniGLM (git pull)")
    tok = tokenizer_of(ckpt["data_meta"], path)  # ValueError naming the file for a damaged record
    rows = ckpt["model_args"].get("vocab_size")
    if not isinstance(rows, int) or rows <= tok.pad_id:
        raise ValueError(f"{path}: the model has vocab_size={rows!r} embedding rows, too few for its "
                         f"tokenizer {tok.describe()} (PAD is id {tok.pad_id}): not the tokenizer it was trained with")
    return ckpt


def tokenizer(ckpt: dict) -> Tokenizer:
    """The tokenizer a checkpoint (from read or load) was trained with, rebuilt from its record:
    a trained one from the ranks stored in it, so nothing but the checkpoint is needed."""
    return tokenizer_of(ckpt["data_meta"], "checkpoint")


def build_model(ckpt: dict, path="checkpoint", lora_base="") -> GPT:
    """The model of a checkpoint dict, its weights loaded strictly (float32, train mode, on the
    weights' device; int8 weights dequantized; a LoRA checkpoint's base read from the path it
    records, or lora_base, checked by sha256, and the adapter merged into it)."""
    if "lora" in ckpt:
        base_file = lora.find_base(checkpoint_file(path), ckpt["lora"]["base"], lora_base)
        base = read(base_file, mmap=True)  # its weights only: its optimizer state is never read
        model = build_model(base, base_file)
        mine, theirs = ({k: v for k, v in args.items() if k != "dropout"} for args in (ckpt["model_args"], base["model_args"]))
        if mine != theirs:
            raise ValueError(f"{path}: its model_args {mine} differ from those of its base {base_file} ({theirs})")
        return lora.merge_into(model.to(next(iter(ckpt["model"].values())).device), ckpt["lora"], ckpt["model"], path)
    state = quant.dequantize_state(ckpt["model"]) if ckpt.get("precision") == "int8" else ckpt["model"]
    try:
        model = GPT(GPTConfig(**ckpt["model_args"]))
        model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in state.items()})
    except (TypeError, RuntimeError) as e:  # unknown model_args, or weights of another shape
        raise ValueError(f"{path}: the weights do not fit the checkpoint's model_args ({e})") from e
    return model


def load(path, device: str = "cpu", dtype: torch.dtype = torch.float32, lora_base="") -> tuple[GPT, dict]:
    """(model in eval mode on device, in dtype; checkpoint dict) from an out_dir's ckpt.pt or a file
    (a LoRA checkpoint: merged into its base; lora_base: where that base is, if it moved)."""
    ckpt = read(path, device)
    model = build_model(ckpt, checkpoint_file(path), lora_base)
    return model.to(device=device, dtype=dtype).eval(), ckpt


def mode_of(ckpt: dict) -> str:
    """How a checkpoint is used by default: "chat" (SFT: answers questions) or "generate"
    (pretrained: continues text)."""
    return "chat" if ckpt["data_meta"].get("kind") == "sft" else "generate"


def can_chat(ckpt: dict) -> bool:
    """True for a checkpoint trained on a question template (SFT); a pretrained one only continues text."""
    return "sft_template" in ckpt["data_meta"]


def peek_mode(path) -> str | None:
    """A checkpoint's mode without reading its weights (mmap); None if it cannot be read."""
    try:
        return mode_of(read(path, mmap=True))
    except (FileNotFoundError, ValueError):
        return None
