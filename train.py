"""Pretrain or fine-tune (SFT) MiniGLM. One script for both: the data folder decides.

    python train.py config/train_cpu.py                     # laptop CPU: small model, minutes
    python train.py config/train_cpu_sft.py                 # SFT from it
    python train.py config/train_config.py                  # the course's 45M model, one CUDA GPU
    python train.py config/train_config_sft.py
    python train.py config/train_cpu.py --max_iters=100 --batch_size=8   # overrides after the file
    torchrun --standalone --nproc_per_node=2 train.py config/train_config.py   # DDP, one machine
    python train.py config/train_cpu_lora.py                # LoRA SFT: adapters only (lora.py), a small checkpoint

init_from: "scratch" (new model), "resume" (out_dir/ckpt_last.pt, else ckpt.pt: weights, optimizer,
iteration, RNG and GradScaler states, so the run continues exactly), or "pretrained" (weights of
init_checkpoint, e.g. the pretrained out dir for SFT; fresh optimizer). A new run refuses an out_dir
that holds a checkpoint unless --overwrite=True. lora_rank > 0 (with init_from=pretrained) trains
LoRA adapters on the frozen init_checkpoint (and, with train_embeddings, its embedding matrix); the
checkpoints then hold only those and the base's path and sha256 (lora.py).
The loss is the cross-entropy summed over the targets the loss mask counts (every token for
pretraining, answer + EOT for SFT), divided by their number over all micro-batches and processes:
the gradient of one big batch. tokens/s counts those targets, MFU every position computed.
Writes out_dir/ckpt.pt (the best val loss: what sample.py, evaluations.py and the web app load),
out_dir/ckpt_last.pt (the latest state, for resume: with each new best, at the end, on Ctrl-C),
both atomically, and out_dir/metrics.jsonl (one JSON object per log line: train and val series).
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

import checkpoint
import lora
from configurator import configure
from data.records import remove_stale_temp_files
from data.tokenizer import check_same, open_tokenizer, tokenizer_of
from data_utils import batch_at, batch_starts, get_batch, load_dataset
from model import GPT, GPTConfig, autocast_context, peak_flops, select_device

# ----------------------------------------------------------------------------- defaults
# I/O
out_dir = "out"
data_dir = "data/processed_pretrain"
init_from = "scratch"           # scratch | resume | pretrained
init_checkpoint = ""            # init_from=pretrained: an out_dir or ckpt.pt
tokenizer = ""                  # "" = the data's; gpt2, zh or a file (as prepare's flag) refuses other data
overwrite = False               # a new run may replace the checkpoints an earlier run left in out_dir
eval_interval = 250
eval_iters = 50
log_interval = 10
always_save_checkpoint = False  # write ckpt_last.pt at every eval, not only with a new best
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
# LoRA (lora.py, peft): adapters on the frozen init_checkpoint; 0 = off, every weight trains
lora_rank = 0
lora_alpha = 16.0               # the adapters' output is scaled by lora_alpha / lora_rank
lora_dropout = 0.0              # dropout on the adapters' input (peft's default 0: on a CPU it costs more than LoRA saves)
lora_targets = ",".join(lora.TARGETS)  # which Linear layers of each block: some of attn.c_attn,attn.c_proj,mlp.c_fc,mlp.c_proj
train_embeddings = False        # with LoRA: the tied embedding/output matrix trains fully too
lora_base = ""                  # a LoRA checkpoint's base (ckpt.pt or out_dir) if it moved since (resume; init_checkpoint)
# -----------------------------------------------------------------------------

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
    config = configure(globals())
    if init_from not in ("scratch", "resume", "pretrained"):
        fail(f"init_from={init_from!r}: expected scratch, resume or pretrained")
    try:
        lora_settings = lora.settings_of(config)
    except ValueError as e:
        fail(str(e))
    if lora_settings and init_from == "scratch":
        fail("LoRA adapts a trained model: --init_from=pretrained --init_checkpoint=<its out_dir> (lora_rank=0 trains from scratch)")
    best_path, last_path = Path(out_dir) / checkpoint.BEST, Path(out_dir) / checkpoint.LAST
    earlier = [p for p in (best_path, last_path) if p.exists() and init_from != "resume"]
    if earlier and not overwrite:
        fail(f"{out_dir} already holds {' and '.join(p.name for p in earlier)} of an earlier run, which "
             f"init_from={init_from} would replace. Continue that run with --init_from=resume, train into "
             "another --out_dir, or pass --overwrite=True to start over here.")

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
    torch.manual_seed(seed + rank)  # dropout differs per process; the batches come from batch_gen
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    try:
        train_ds = load_dataset(data_dir, "train")
        # prepared with val_fraction=0: no val split; checkpoints are then chosen by train loss
        val_ds = load_dataset(data_dir, "val") if train_ds.meta["splits"]["val"]["file_tokens"] else None
        tok = tokenizer_of(train_ds.meta, Path(data_dir) / "meta.json")  # val reads the same meta.json
    except (FileNotFoundError, ValueError, KeyError) as e:
        fail(f"data_dir={data_dir}: {e}")
    try:
        if tokenizer:  # the prepare scripts' --tokenizer value, compared by content
            check_same(open_tokenizer(tokenizer), f"--tokenizer={tokenizer}", tok, f"data_dir={data_dir}")
    except ValueError as e:
        fail(f"{e}: python data/prepare.py --tokenizer={tokenizer} --out_dir={data_dir} (prepare_sft.py for SFT data)")
    meta = train_ds.meta | {"tokenizer": tok.meta()}  # the record whole (a trained one's ranks): ckpt.pt needs nothing else
    if val_ds is None and master:
        print(f"warning: {data_dir} has no val split; best checkpoints are chosen by train loss", file=sys.stderr)
    block_size = meta["block_size"]

    iter_num, best_val_loss, ckpt = 0, float("inf"), None
    # the embedding has a row for every id of the data's tokenizer, PAD included, rounded up to 64
    model_args = dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size,
                      vocab_size=tok.model_vocab_size, dropout=dropout, bias=bias)
    if init_from == "scratch":
        model = GPT(GPTConfig(**model_args))
    else:
        source = (last_path if last_path.exists() else best_path) if init_from == "resume" else init_checkpoint
        if init_from == "resume" and source == best_path and best_path.exists() and master:
            print(f"note: no {last_path} (the latest state; older versions of train.py wrote only ckpt.pt): "
                  f"resuming from the best checkpoint {best_path}", file=sys.stderr)
        if not source:
            fail("init_from=pretrained needs init_checkpoint=<the pretrained out_dir or ckpt.pt>")
        try:
            ckpt = checkpoint.read(source)
            if "precision" in ckpt:
                fail(f"{source} holds {ckpt['precision']} weights for generation (sample.py --save_quantized): "
                     "train from the float checkpoint it was made from")
            check_same(checkpoint.tokenizer(ckpt), f"checkpoint {source}", tok, f"data_dir={data_dir}")
            resumed_lora = {k: v for k, v in ckpt.get("lora", {}).items() if k != "base"} or None
            if init_from == "resume" and resumed_lora != lora_settings:
                fail(f"{source} was trained with LoRA settings {resumed_lora} (None: full), this run has "
                     f"{lora_settings}: resume with the run's own settings (its config file)")
            if init_from == "resume" and resumed_lora:  # the base, then its adapter (below)
                base_file = lora.find_base(checkpoint.checkpoint_file(source), ckpt["lora"]["base"], lora_base)
                model = checkpoint.build_model(checkpoint.read(base_file, mmap=True), base_file)
            else:
                model, base_file = checkpoint.build_model(ckpt, source, lora_base), checkpoint.checkpoint_file(source)
            base_ref = lora.base_reference(base_file, out_dir) if lora_settings else None  # where it is now
            model.set_dropout(dropout)  # the run's, not the checkpoint's
            if lora_settings:  # after set_dropout: the adapters' own dropout is lora_dropout
                lora.attach(model, lora_settings)
                if init_from == "resume":
                    lora.load_adapter(model, ckpt["model"], source)
        except (FileNotFoundError, ValueError) as e:
            fail(str(e))
        model_args = ckpt["model_args"] | {"dropout": dropout}
        config.update({k: model_args[k] for k in ("n_layer", "n_head", "n_embd", "bias")})  # the model's truth
        if block_size > model_args["block_size"]:  # shorter blocks are fine: SFT pairs are short
            fail(f"checkpoint {source} has block_size={model_args['block_size']}, data {data_dir} has "
                 f"block_size={block_size}: prepare the data with --block_size={model_args['block_size']} or less")
        if init_from == "resume":
            iter_num, best_val_loss = ckpt["iter_num"], ckpt["best_val_loss"]
    model.to(device)
    optimizer = model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2), device_type)
    batch_gen = torch.Generator().manual_seed(seed)  # one stream of global batches, shared by all processes
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == "float16")
    if init_from == "resume":
        optimizer.load_state_dict(ckpt["optimizer"])
        rng = ckpt["rng"]

        def mine(states):  # this process's state (per-process lists; older checkpoints: one state)
            return states[rank % len(states)] if isinstance(states, list) else states
        batch_gen.set_state(mine(rng["batch"]))
        torch.set_rng_state(mine(rng["torch"]))
        if device_type == "cuda" and rng.get("cuda"):
            torch.cuda.set_rng_state(mine(rng["cuda"]), device)
        if ckpt.get("scaler"):  # {} from a disabled scaler (float32, bfloat16)
            scaler.load_state_dict(ckpt["scaler"])
        if master:
            print(f"resuming from {source} (iter {iter_num}, best val loss {best_val_loss:.4f})")
    ckpt = None  # free memory
    raw_model = model
    if compile:
        model = torch.compile(model)
    if ddp:
        model = DDP(model, device_ids=[local_rank] if device_type == "cuda" else None)
    ctx = autocast_context(device, dtype)
    positions_per_iter = gradient_accumulation_steps * world * batch_size * block_size
    peak = peak_flops(device)
    if master:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        remove_stale_temp_files(out_dir, "ckpt*.pt.tmp-*")
        for p in earlier:
            p.unlink()
            print(f"overwrite=True: removed {p} of the earlier run")
        print(json.dumps(config, ensure_ascii=False))
        trainable = sum(p.numel() for p in lora.trainable(raw_model).values())
        total = sum(p.numel() for name, p in raw_model.named_parameters() if ".lora_" not in name)  # the model's own
        print(f"{total / 1e6:.2f}M parameters, {trainable:,} trained ({trainable / total:.2%}"
              + (f": LoRA rank {lora_rank}{' + embeddings' if train_embeddings else ''})" if lora_rank else ")")
              + f"; data {data_dir} ({meta['kind']}, "
              f"packing {meta.get('packing', meta.get('mode'))}, block_size {block_size}, tokenizer {tok.describe()}); "
              f"{positions_per_iter:,} positions/iter; "
              f"device {device}, {dtype}, {world} process(es)")

    def train_batch():
        """This process's slice of the next global micro-batch (world * batch_size blocks from the
        shared generator): the data seen does not depend on the number of processes."""
        starts = batch_starts(train_ds, world * batch_size, batch_gen)
        return batch_at(train_ds, starts[rank * batch_size:(rank + 1) * batch_size], device)

    def save_checkpoint(best: bool):
        """ckpt_last.pt, and ckpt.pt too when best or when there is no best yet (a hard link to the
        same bytes, a copy where links are not supported). Atomic: a temp file, then os.replace; a
        kill mid-save changes neither file."""
        best = best or not best_path.exists()
        rngs = [(torch.get_rng_state(), torch.cuda.get_rng_state(device) if device_type == "cuda" else None)]
        if ddp:
            gathered = [None] * world
            torch.distributed.all_gather_object(gathered, rngs[0])
            rngs = gathered
        if not master:
            return
        rng = {"batch": batch_gen.get_state(), "torch": [cpu for cpu, _ in rngs]}
        if device_type == "cuda":
            rng["cuda"] = [gpu for _, gpu in rngs]
        state = {"model": lora.adapter_state(raw_model) if lora_settings else raw_model.state_dict(),
                 "optimizer": optimizer.state_dict(),
                 "model_args": model_args, "config": config, "iter_num": iter_num,
                 "best_val_loss": best_val_loss, "data_meta": meta, "rng": rng, "scaler": scaler.state_dict()}
        if lora_settings:  # only what trained, and the base it needs (lora.py)
            state["lora"] = lora_settings | {"base": base_ref}
        checkpoint.save(out_dir, state, best)
        print(f"saved iter {iter_num}: latest state {last_path}" + (f", best {best_path}" if best else
              f"; the best ({best_val_loss:.4f}) stays in {best_path}"))

    @torch.no_grad()
    def estimate_loss() -> dict:
        """Per split: NLL summed over the counted targets of eval_iters batches on every process,
        divided by their number (fixed batches, own RNG)."""
        model.eval()
        splits = (("train", train_ds), ("val", val_ds)) if val_ds else (("train", train_ds),)
        sums = torch.zeros(len(splits), 2, device=device)  # (split, [nll, count])
        for i, (_, ds) in enumerate(splits):
            g = torch.Generator().manual_seed(seed + 1000 + rank)
            for _ in range(eval_iters):
                x, y, m = get_batch(ds, batch_size, device, g)
                with ctx:
                    _, nll = model(x, y, m, return_logits=False, reduction="sum")
                sums[i] += torch.stack([nll, m.sum().float()])
        model.train()
        if ddp:
            torch.distributed.all_reduce(sums)
        out = {name: (s[0] / s[1].clamp(min=1)).item() for (name, _), s in zip(splits, sums, strict=True)}
        out.setdefault("val", out["train"])  # no val split: checkpoints follow the train loss
        return out

    metrics = open(Path(out_dir) / "metrics.jsonl", "a" if init_from == "resume" else "w",
                   encoding="utf-8") if master else None

    def log(record: dict):
        metrics.write(json.dumps(record) + "\n")
        metrics.flush()

    interrupted = []
    signal.signal(signal.SIGTERM, lambda *_: interrupted.append("SIGTERM"))
    t_start = time.time()
    t_log, eval_seconds, done_iters, counted = time.time(), 0.0, 0, 0.0  # step timing leaves evals out
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
                    fail(f"val loss is {losses['val']} at iter {iter_num}; stopped. The checkpoints in "
                         f"{out_dir} are untouched. Lower learning_rate or check the data.")
                improved = losses["val"] < best_val_loss
                if improved:
                    best_val_loss = losses["val"]
                if iter_num > 0 and (improved or always_save_checkpoint or iter_num == max_iters):
                    save_checkpoint(best=improved)
                eval_seconds += time.time() - t_eval
            if iter_num >= max_iters:
                if ddp:
                    torch.distributed.barrier()  # rank 0 may still be saving; leave together
                break
            # the step's micro-batches first: the summed NLL is divided by the targets counted in
            # all of them on all processes, so the gradient is that of one big batch's mean
            batches = [train_batch() for _ in range(gradient_accumulation_steps)]
            count = sum(m.sum() for _, _, m in batches).float()
            if ddp:
                torch.distributed.all_reduce(count)
            # [nll, micro-batches with a non-finite loss, processes told to stop (SIGTERM)]
            sums = torch.tensor([0.0, 0.0, float(bool(interrupted))], device=device)
            for micro, (x, y, m) in enumerate(batches):
                if ddp:
                    model.require_backward_grad_sync = micro == gradient_accumulation_steps - 1
                with ctx:
                    _, nll = model(x, y, m, return_logits=False, reduction="sum")
                sums[:2] += torch.stack([nll.detach(), (~torch.isfinite(nll)).float()])
                # DDP averages the processes' gradients; * world turns that into their sum
                scaler.scale(nll * world / count.clamp(min=1)).backward()
            if ddp:  # every process learns of a bad micro-batch or a SIGTERM anywhere: all stop together
                torch.distributed.all_reduce(sums)
            nll_sum, bad, stop = sums.tolist()
            if bad:
                fail(f"train loss is not finite at iter {iter_num} (in {bad:.0f} of "
                     f"{gradient_accumulation_steps * world} micro-batches); stopped before the update. "
                     f"The checkpoints in {out_dir} are untouched. Lower learning_rate or check the data.")
            if grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            iter_num += 1
            done_iters += 1
            counted += count.item()
            if master and (iter_num % log_interval == 0 or iter_num == max_iters):
                lossf = nll_sum / max(1.0, count.item())
                dt = (time.time() - t_log - eval_seconds) / done_iters
                tps = counted / (dt * done_iters)  # targets the loss counts
                pps = positions_per_iter / dt  # every position the transformer computed
                uncounted = 1 - counted / (positions_per_iter * done_iters)  # padding (+ SFT prompts)
                flops = raw_model.flops(positions_per_iter * done_iters, counted)  # the output layer: counted only
                mfu = flops / (dt * done_iters) / peak if peak else None
                eta = (max_iters - iter_num) * dt
                print(f"iter {iter_num}: loss {lossf:.4f}, lr {lr:.2e}, {dt * 1000:.0f} ms/iter, "
                      f"{tps:,.0f} tokens/s, mfu {f'{mfu:.1%}' if mfu is not None else 'n/a'}, "
                      f"{uncounted:.1%} of positions uncounted, ETA {eta / 60:.1f} min")
                log({"iter": iter_num, "split": "train", "loss": lossf, "lr": lr, "ms_per_iter": dt * 1000,
                     "tokens_per_s": tps, "positions_per_s": pps, "mfu": mfu, "uncounted_share": uncounted,
                     "time": time.time() - t_start})
                t_log, eval_seconds, done_iters, counted = time.time(), 0.0, 0, 0.0
            if stop:
                raise KeyboardInterrupt
    except KeyboardInterrupt:
        if master:
            print(f"interrupted at iter {iter_num}: saving the latest state before exiting", file=sys.stderr)
        save_checkpoint(best=False)  # an unevaluated state never replaces the best
        sys.exit(130)
    finally:
        if metrics:
            metrics.close()
        if ddp:
            destroy_process_group()
    if ddp:  # done and saved: skip the interpreter's teardown, where gloo's threads now and then abort a process
        sys.stdout.flush(), sys.stderr.flush()  # ("terminate called without an active exception": 2 runs in 60 here)
        os._exit(0)
