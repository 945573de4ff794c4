"""LoRA for MiniGLM: low-rank adapters on the transformer's Linear layers (Hugging Face's peft),
optionally with the tied embedding/output matrix trained fully; and the adapter checkpoint's side:
its base reference (path and sha256) and the merge into the base weights.

    python train.py config/train_cpu_lora.py          # train.py --lora_rank=8: lora.attach(model, settings)
    python sample.py --out_dir=out-cpu-lora           # checkpoint.load merges it: lora.merge_into(model, ...)

A frozen Linear W (out, in) gets a trainable path: y = W x + (alpha / rank) * B A dropout(x), with A
(rank, in) random and B (out, rank) zero, so training starts from the base model's exact outputs
(peft's initialisation). Only A and B learn (and, with train_embeddings, the embedding matrix,
which is also the output layer: weight tying).

A LoRA run's checkpoint stores only what it trained: its "model" holds the adapter weights under
peft's names (transformer.h.0.attn.c_attn.lora_A.weight, ...lora_B.weight) and, with
train_embeddings, transformer.wte.weight; its "lora" entry holds the settings and the base:
{"rank", "alpha", "dropout", "targets", "train_embeddings", "base": {"path", "sha256"}}, the path
of the base's ckpt.pt relative to the LoRA checkpoint's folder (absolute where no relative path
exists). Loading checks the base's sha256, so a base trained further, or another model, is refused
by name. Serving never imports peft: the merge is the formula above, W + (alpha / rank) B A, tested
against peft's own forward (tests/test_lora.py).
"""
import hashlib
import os
from functools import lru_cache
from pathlib import Path

import torch

TARGETS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")  # every Linear of a block
EMBEDDING = "transformer.wte.weight"  # the same Parameter as lm_head.weight (weight tying)
SETTINGS = ("rank", "alpha", "dropout", "targets", "train_embeddings")


def settings_of(config: dict) -> dict | None:
    """The LoRA settings of a train.py config (None: lora_rank=0, full fine-tuning); ValueError
    naming the flag for a value out of range."""
    rank = config["lora_rank"]
    if rank == 0:
        if config["train_embeddings"]:
            raise ValueError("train_embeddings=True trains the embeddings beside LoRA adapters: set lora_rank too "
                             "(without LoRA every weight trains anyway)")
        return None
    given = [t.strip() for t in config["lora_targets"].split(",") if t.strip()]
    bad, targets = [t for t in given if t not in TARGETS], [t for t in TARGETS if t in given]  # TARGETS' order
    if rank < 0:
        raise ValueError(f"lora_rank={rank}: expected 0 (off) or a whole number >= 1, e.g. 8")
    if config["lora_alpha"] <= 0:
        raise ValueError(f"lora_alpha={config['lora_alpha']}: expected a number > 0 (the scale is lora_alpha / lora_rank)")
    if not 0 <= config["lora_dropout"] < 1:
        raise ValueError(f"lora_dropout={config['lora_dropout']}: expected 0 <= p < 1")
    if bad or not targets:
        raise ValueError(f"lora_targets={config['lora_targets']!r}: expected some of {','.join(TARGETS)} "
                         "(comma-separated)" + (f"; unknown: {', '.join(bad)}" if bad else ""))
    return {"rank": rank, "alpha": float(config["lora_alpha"]), "dropout": float(config["lora_dropout"]),
            "targets": targets, "train_embeddings": bool(config["train_embeddings"])}


def attach(model: torch.nn.Module, settings: dict) -> torch.nn.Module:
    """Inject the adapters into model in place (peft) and freeze everything else but, with
    train_embeddings, the embedding. At this point the model's outputs are unchanged (B = 0)."""
    from peft import LoraConfig, inject_adapter_in_model  # here: only LoRA training pays peft's import (~2 s)
    inject_adapter_in_model(LoraConfig(r=settings["rank"], lora_alpha=settings["alpha"],
                                       lora_dropout=settings["dropout"], target_modules=list(settings["targets"])),
                            model)
    if settings["train_embeddings"]:
        model.get_parameter(EMBEDDING).requires_grad_(True)
    return model


def trainable(model: torch.nn.Module) -> dict:
    """{name in the checkpoint: parameter} of what trains, peft's adapter name left out of the
    names (lora_A.default.weight -> lora_A.weight); named_parameters names the tied matrix once."""
    return {name.replace(".default.", "."): p for name, p in model.named_parameters() if p.requires_grad}


def adapter_state(model: torch.nn.Module) -> dict:
    """What a LoRA checkpoint's "model" holds: the trained tensors only."""
    return {name: p.detach() for name, p in trainable(model).items()}


def load_adapter(model: torch.nn.Module, state: dict, path) -> None:
    """Load a LoRA checkpoint's trained tensors into a model that attach() prepared with the same
    settings: strictly (the same names and shapes, or a ValueError naming the file)."""
    params = trainable(model)
    wrong = sorted(set(params) ^ set(state)) + [k for k in params.keys() & state.keys()
                                               if params[k].shape != state[k].shape]
    if wrong:
        raise ValueError(f"{path}: its adapter does not fit the LoRA settings ({', '.join(wrong[:4])})")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state[name])


def merge_into(model: torch.nn.Module, settings: dict, state: dict, path) -> torch.nn.Module:
    """Fold a LoRA checkpoint's adapters into a plain model of its base, in place:
    W += (alpha / rank) * B @ A for each adapted Linear, and the trained embedding replaces the
    base's. The result computes what the adapted model computes (without dropout), at the base's speed."""
    scale = settings["alpha"] / settings["rank"]
    weights = dict(model.named_parameters())
    pairs = {name.removesuffix(".lora_A.weight") for name in state if name.endswith(".lora_A.weight")}
    expected = {f"{layer}.lora_{ab}.weight" for layer in pairs for ab in "AB"} | (
        {EMBEDDING} if settings["train_embeddings"] else set())
    if set(state) != expected or not all(f"{layer}.weight" in weights for layer in pairs):
        odd = sorted(set(state) ^ expected) or sorted(layer for layer in pairs if f"{layer}.weight" not in weights)
        raise ValueError(f"{path}: not an adapter of this model ({', '.join(odd[:4])})")
    with torch.no_grad():
        for layer in pairs:
            a, b, w = state[f"{layer}.lora_A.weight"], state[f"{layer}.lora_B.weight"], weights[f"{layer}.weight"]
            if a.shape[1] != w.shape[1] or b.shape[0] != w.shape[0] or a.shape[0] != b.shape[1]:
                raise ValueError(f"{path}: the adapter of {layer} has shapes {tuple(b.shape)} @ {tuple(a.shape)}, "
                                 f"the base's weight {tuple(w.shape)}")
            w += scale * (b.to(w) @ a.to(w))  # (out, rank) @ (rank, in)
        if settings["train_embeddings"]:
            weights[EMBEDDING].copy_(state[EMBEDDING])
    return model


def sha256_of(path) -> str:
    """The file's sha256, hashed once per (file, size, modification time): finding a base and then
    recording it (train.py's resume), or loading two LoRA models of one base, reads it once."""
    st = os.stat(path)
    return _sha256(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


@lru_cache(maxsize=32)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def base_reference(base_file, out_dir) -> dict:
    """{"path", "sha256"} of a base checkpoint file: the path relative to out_dir (the LoRA run's
    folder), so that the two folders can move together; absolute where none exists (another drive)."""
    base_file = Path(base_file).absolute()
    try:
        path = os.path.relpath(base_file, Path(out_dir).absolute())
    except ValueError:
        path = str(base_file)
    return {"path": Path(path).as_posix(), "sha256": sha256_of(base_file)}


def recorded_base(lora_file, base: dict) -> Path:
    """Where a LoRA checkpoint says its base is (its reference resolved against the file's folder)."""
    return Path(os.path.normpath(Path(lora_file).parent / base["path"]))  # out-lora/../out-cpu -> out-cpu


def find_base(lora_file, base: dict, override="") -> Path:
    """The base checkpoint file of the LoRA checkpoint lora_file, the first of these whose sha256 is
    the recorded one: the recorded path, the same from the file's real folder (lora_file reached
    through a symlink), and override (--lora_base: a file or an out_dir; a fallback, so one flag
    serves every model of the web app). FileNotFoundError or ValueError naming what was tried."""
    recorded = recorded_base(lora_file, base)
    real = Path(os.path.normpath(Path(lora_file).resolve().parent / base["path"]))
    candidates = [recorded] + ([real] if os.path.abspath(real) != os.path.abspath(recorded) else []) + (
        [Path(override)] if override else [])
    tried, changed = [], False
    for path in candidates:
        path = path / "ckpt.pt" if path.is_dir() else path
        if not path.exists():
            tried.append(f"{path} is missing")
            continue
        digest = sha256_of(path)
        if digest == base["sha256"]:
            return path
        changed = True
        tried.append(f"{path} is not the one the adapter was trained on (sha256 {digest[:16]}…; trained further, "
                     "or another model?)")
    why = f"{lora_file}: its base checkpoint {'; '.join(tried)}. A LoRA checkpoint holds only the " \
          f"adapter and needs the base it was trained on (sha256 {base['sha256'][:16]}…): "
    if not changed:
        raise FileNotFoundError(why + f"put it back at {recorded}, or name where it is now with --lora_base=PATH "
                                "(the base's ckpt.pt or its out_dir)")
    raise ValueError(why + "name the right file with --lora_base=PATH, or train the LoRA again on this base")
