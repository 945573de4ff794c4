"""Pretrain or fine-tune (SFT) MiniGLM. One script for both: the data folder decides.

    python train.py config/train_cpu.py                     # laptop CPU: small model, minutes
    python train.py config/train_cpu_sft.py                 # SFT from it
    python train.py config/train_config.py                  # the course's 45M model, one CUDA GPU
    python train.py config/train_config_sft.py
    python train.py config/train_cpu.py --max_iters=100 --batch_size=8   # overrides after the file
    torchrun --standalone --nproc_per_node=2 train.py config/train_config.py   # DDP, one machine

init_from: "scratch" (new model), "resume" (out_dir/ckpt.pt: weights, optimizer, iteration and
RNG states, so the run continues exactly), or "pretrained" (weights of init_checkpoint, e.g. the
pretrained out dir for SFT; fresh optimizer). The loss is the mean cross-entropy over the targets
the data's loss mask counts: every token for pretraining, answer + EOT for SFT.
Writes out_dir/ckpt.pt (atomically: on a new best val loss and at the end, also on Ctrl-C) and
out_dir/metrics.jsonl (one JSON object per log line: train and val series).
"""
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import torch
from torch.distributed import destroy_process_group, init_process_group
from torch.nn.parallel import DistributedDataParallel as DDP

from data.tokenizer import MODEL_VOCAB_SIZE
from data_utils import get_batch, load_dataset
from model import GPT, GPTConfig, autocast_context, select_device
from sample import load_checkpoint

# ----------------------------------------------------------------------------- defaults
# I/O
out_dir = "out"
data_dir = "data/processed_pretrain"
init_from = "scratch"           # scratch | resume | pretrained
init_checkpoint = ""            # init_from=pretrained: an out_dir or ckpt.pt
eval_interval = 250
eval_iters = 50
log_interval = 10
always_save_checkpoint = False  # save at every eval, not only on a new best val loss
# model (block_size comes from the data's meta.json)
n_layer = 6
n_head = 8
n_embd = 512
dropout = 0.0
bias = False
# optimization
batch_size = 32                 # per process, per micro step
gradient_accumulation_steps = 1 # total over all DDP processes
max_iters = 5000
learning_rate = 6e-4
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
warmup_iters = 100
lr_decay_iters = 5000           # cosine decay to min_lr by here
min_lr = 6e-5
# system
device = ""                     # "" = cuda, then mps, then cpu
dtype = ""                      # "" = bfloat16 where supported, float16 on older GPUs, float32 on CPU
compile = False
seed = 1337
expect_cuda = False             # a config sized for a GPU: warn when there is none
# -----------------------------------------------------------------------------

# Dense bf16/fp16 tensor-core peaks (FLOP/s) for MFU; unknown devices report no MFU.
PEAK_FLOPS = {"H100": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12, "L40": 181e12,
              "4090": 165e12, "A6000": 155e12, "3090": 71e12, "A10": 125e12, "L4": 121e12,
              "V100": 125e12, "T4": 65e12, "2080": 43e12}


def peak_flops(dev: str) -> float | None:
    if not dev.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(dev)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def lr_at(it: int) -> float:
    """Linear warmup, then cosine decay to min_lr at lr_decay_iters, then min_lr."""
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it > lr_decay_iters:
        return min_lr
    ratio = (it - warmup_iters) / max(1, lr_decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)


def fail(message: str):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
    exec(open(Path(__file__).resolve().parent / "configurator.py", encoding="utf-8").read())
    if init_from not in ("scratch", "resume", "pretrained"):
        fail(f"init_from={init_from!r}: expected scratch, resume or pretrained")

    # ------------------------------------------------------------------ setup
    ddp = int(os.environ.get("RANK", -1)) != -1
    device, dtype = select_device(device, dtype)
    if ddp:
        rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
        if device.startswith("cuda"):
            device = f"cuda:{local_rank}"
            torch.cuda.set_device(device)
        init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
        if gradient_accumulation_steps % world:
            fail(f"gradient_accumulation_steps={gradient_accumulation_steps} must be a multiple of "
                 f"the {world} processes")
        gradient_accumulation_steps //= world
    else:
        rank, local_rank, world = 0, 0, 1
    master = rank == 0
    device_type = "cuda" if device.startswith("cuda") else device
    if expect_cuda and device_type != "cuda" and master:
        print("warning: this config is sized for a CUDA GPU and there is none; it runs on "
              f"{device} but slowly. For a laptop use config/train_cpu.py.", file=sys.stderr)
    torch.manual_seed(seed + rank)
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    try:
        train_ds = load_dataset(data_dir, "train")
        # prepared with val_fraction=0: no val split; checkpoints are then chosen by train loss
        val_ds = load_dataset(data_dir, "val") if train_ds.meta["splits"]["val"]["file_tokens"] else None
    except (FileNotFoundError, ValueError, KeyError) as e:
        fail(f"data_dir={data_dir}: {e}")
    meta = train_ds.meta
    if val_ds is None and master:
        print(f"warning: {data_dir} has no val split; best checkpoints are chosen by train loss", file=sys.stderr)
    block_size = meta["block_size"]

    ckpt_path = Path(out_dir) / "ckpt.pt"
    iter_num, best_val_loss, ckpt = 0, float("inf"), None
    model_args = dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size,
                      vocab_size=MODEL_VOCAB_SIZE, dropout=dropout, bias=bias)
    if init_from == "scratch":
        model = GPT(GPTConfig(**model_args))
    else:
        source = ckpt_path if init_from == "resume" else init_checkpoint
        if not source:
            fail("init_from=pretrained needs init_checkpoint=<the pretrained out_dir or ckpt.pt>")
        try:
            model, ckpt = load_checkpoint(source, "cpu")
        except (FileNotFoundError, ValueError) as e:
            fail(str(e))
        model_args = ckpt["model_args"] | {"dropout": dropout}
        config.update({k: model_args[k] for k in ("n_layer", "n_head", "n_embd", "bias")})  # the model's truth
        if model_args["block_size"] != block_size:
            fail(f"checkpoint {source} has block_size={model_args['block_size']}, data {data_dir} has "
                 f"block_size={block_size}: prepare the data with --block_size={model_args['block_size']}")
        model.train()
        for m in model.modules():  # the run's dropout, not the checkpoint's
            if isinstance(m, torch.nn.Dropout):
                m.p = dropout
        if init_from == "resume":
            iter_num, best_val_loss = ckpt["iter_num"], ckpt["best_val_loss"]
    model.to(device)
    optimizer = model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2), device_type)
    batch_gen = torch.Generator().manual_seed(seed + rank)
    if init_from == "resume":
        optimizer.load_state_dict(ckpt["optimizer"])
        batch_gen.set_state(ckpt["rng"]["batch"][rank % len(ckpt["rng"]["batch"])])
        torch.set_rng_state(ckpt["rng"]["torch"])
    ckpt = None  # free memory
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == "float16")
    raw_model = model
    if compile:
        model = torch.compile(model)
    if ddp:
        model = DDP(model, device_ids=[local_rank] if device_type == "cuda" else None)
    ctx = autocast_context(device, dtype)
    tokens_per_iter = gradient_accumulation_steps * world * batch_size * block_size
    peak = peak_flops(device)
    if master:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        print(json.dumps(config, ensure_ascii=False))
        print(f"{raw_model.num_params() / 1e6:.2f}M parameters; data {data_dir} ({meta['kind']}, "
              f"mode {meta['mode']}, block_size {block_size}); {tokens_per_iter:,} tokens/iter; "
              f"device {device}, {dtype}, {world} process(es)")

    def save_checkpoint():
        """Atomic: write to a temp file, then os.replace; a kill mid-save never corrupts ckpt.pt."""
        rngs = [batch_gen.get_state()]
        if ddp:
            gathered = [None] * world
            torch.distributed.all_gather_object(gathered, rngs[0])
            rngs = gathered
        if not master:
            return
        state = {"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                 "model_args": model_args, "config": config, "iter_num": iter_num,
                 "best_val_loss": best_val_loss, "data_meta": meta,
                 "rng": {"torch": torch.get_rng_state(), "batch": rngs}}
        tmp = ckpt_path.with_name(f"ckpt.pt.tmp-{os.getpid()}")
        torch.save(state, tmp)
        os.replace(tmp, ckpt_path)
        print(f"saved {ckpt_path} (iter {iter_num})")

    @torch.no_grad()
    def estimate_loss() -> dict:
        """Mean masked loss over eval_iters batches of each split (fixed batches, own RNG)."""
        out = {}
        model.eval()
        for split, ds in (("train", train_ds), ("val", val_ds)) if val_ds else (("train", train_ds),):
            g = torch.Generator().manual_seed(seed + 1000 + rank)
            losses = torch.zeros(eval_iters)
            for k in range(eval_iters):
                x, y, m = get_batch(ds, batch_size, device, g)
                with ctx:
                    _, loss = model(x, y, m, return_logits=False)
                losses[k] = loss.item()
            out[split] = losses.mean().item()
        out.setdefault("val", out["train"])  # no val split: checkpoints follow the train loss
        model.train()
        if ddp:
            t = torch.tensor([out["train"], out["val"]], device=device)
            torch.distributed.all_reduce(t)
            out = {"train": t[0].item() / world, "val": t[1].item() / world}
        return out

    metrics = open(Path(out_dir) / "metrics.jsonl", "a", encoding="utf-8") if master else None

    def log(record: dict):
        metrics.write(json.dumps(record) + "\n")
        metrics.flush()

    interrupted = []
    signal.signal(signal.SIGTERM, lambda *_: interrupted.append("SIGTERM"))
    t_start = time.time()
    t_log, eval_seconds, done_iters = time.time(), 0.0, 0  # step timing leaves evals out
    try:
        while True:
            lr = lr_at(iter_num)
            for group in optimizer.param_groups:
                group["lr"] = lr
            if iter_num % eval_interval == 0 or iter_num == max_iters:
                t_eval = time.time()
                losses = estimate_loss()
                if master:
                    print(f"iter {iter_num}: train loss {losses['train']:.4f}, "
                          + (f"val loss {losses['val']:.4f}" if val_ds else "no val split"))
                    log({"iter": iter_num, "split": "val", "train_loss": losses["train"],
                         "val_loss": losses["val"] if val_ds else None, "lr": lr, "time": time.time() - t_start})
                if not math.isfinite(losses["val"]):
                    fail(f"val loss is {losses['val']} at iter {iter_num}; stopped. The last good "
                         f"checkpoint {ckpt_path} is untouched. Lower learning_rate or check the data.")
                improved = losses["val"] < best_val_loss
                if improved:
                    best_val_loss = losses["val"]
                if iter_num > 0 and (improved or always_save_checkpoint or iter_num == max_iters):
                    save_checkpoint()
                eval_seconds += time.time() - t_eval
            if iter_num >= max_iters:
                if ddp:
                    torch.distributed.barrier()  # rank 0 may still be saving; leave together
                break
            for micro in range(gradient_accumulation_steps):
                x, y, m = get_batch(train_ds, batch_size, device, batch_gen)
                if ddp:
                    model.require_backward_grad_sync = micro == gradient_accumulation_steps - 1
                with ctx:
                    _, loss = model(x, y, m, return_logits=False)
                    loss = loss / gradient_accumulation_steps
                scaler.scale(loss).backward()
            if not torch.isfinite(loss):
                fail(f"train loss is {loss.item() * gradient_accumulation_steps} at iter {iter_num}; "
                     f"stopped. The last good checkpoint {ckpt_path} is untouched. Lower learning_rate.")
            if grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            iter_num += 1
            done_iters += 1
            if master and (iter_num % log_interval == 0 or iter_num == max_iters):
                lossf = loss.item() * gradient_accumulation_steps  # syncs with the device
                dt = (time.time() - t_log - eval_seconds) / done_iters
                tps = tokens_per_iter / dt
                mfu = raw_model.flops_per_token() * tps / peak if peak else None
                eta = (max_iters - iter_num) * dt
                print(f"iter {iter_num}: loss {lossf:.4f}, lr {lr:.2e}, {dt * 1000:.0f} ms/iter, "
                      f"{tps:,.0f} tokens/s, mfu {f'{mfu:.1%}' if mfu is not None else 'n/a'}, "
                      f"ETA {eta / 60:.1f} min")
                log({"iter": iter_num, "split": "train", "loss": lossf, "lr": lr, "ms_per_iter": dt * 1000,
                     "tokens_per_s": tps, "mfu": mfu, "time": time.time() - t_start})
                t_log, eval_seconds, done_iters = time.time(), 0.0, 0
            if interrupted:
                raise KeyboardInterrupt
    except KeyboardInterrupt:
        if master:
            print(f"interrupted at iter {iter_num}: saving a checkpoint before exiting", file=sys.stderr)
        save_checkpoint()
        sys.exit(130)
    finally:
        if metrics:
            metrics.close()
        if ddp:
            destroy_process_group()
