"""int8 weights for generation (--precision=int8): a model four times smaller than float32 that
decoded 4-5x faster on this project's 2-core CPUs (README), where a token's time is mostly reading
the weights.

    import quant
    model = quant.quantize_int8(model)     # in place: every Linear's weight int8, the rest bfloat16
    state = quant.dequantize_state(state)  # a saved int8 state_dict back to float32 weights

Each weight row (one output feature) is stored as int8 with one scale: w = q * scale, with
|q| <= 127 and the row's largest |w| at exactly 127 * scale (symmetric, per output channel; the
scale rounded to bfloat16 first, so that dequantizing and quantizing again gives the same q and
scale: a saved int8 checkpoint loads exactly). Activations are bfloat16. The product is torch's
own kernel, torch._weight_int8pack_mm (the CPU kernel torchao's int8 weight-only quantization
compiles to); where it does not apply (an input width not a multiple of 16: it computes wrong
values there), the weight is dequantized for the product instead, slower but right.

The tied embedding/output matrix stays tied: one int8 table and its scales, which the output
layer multiplies by and the embedding looks rows up in (scaled as they are read).

Why this kernel (README "Precision"): torch's dynamic int8 (torch.ao.quantization.quantize_dynamic,
fbgemm) decodes faster here, but torch 2.13 deprecates it and its quantized tensors, and
torchao's eager int8 path is slower than float32 without torch.compile.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

ACT_DTYPE = torch.bfloat16  # the activations' dtype, and the scales' (the kernel wants them alike)
KERNEL_WIDTH = 16           # torch._weight_int8pack_mm is right for input widths that are multiples of 16


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8, scale ACT_DTYPE) for a float weight (N, K): w ~= q * scale[:, None], per row."""
    w = w.detach().float()
    scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12).to(ACT_DTYPE)
    q = torch.round(w / scale.float()[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.float()[:, None]


class Int8Linear(nn.Module):
    """A Linear whose weight (N, K) is int8 with a scale per row; bias (if any) in ACT_DTYPE.
    weight and scale are Parameters without gradients, so num_params() and .to(device) see them
    (.to(dtype) changes only floating tensors: the int8 weight stays int8)."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.weight = nn.Parameter(q, requires_grad=False)
        self.scale = nn.Parameter(scale, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(ACT_DTYPE), requires_grad=False)

    @classmethod
    def from_float(cls, linear: nn.Linear) -> "Int8Linear":
        return cls(*quantize_rows(linear.weight), linear.bias)

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1]).to(self.scale.dtype)  # (B*T, K)
        if shape[-1] % KERNEL_WIDTH == 0:
            y = torch._weight_int8pack_mm(x, self.weight, self.scale)
        else:
            y = F.linear(x, self.weight.to(x.dtype) * self.scale[:, None])
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], -1)


class Int8Embedding(nn.Module):
    """The embedding of a tied model: the rows of the output layer's int8 table, scaled as read."""

    def __init__(self, table: Int8Linear):
        super().__init__()
        self.weight, self.scale = table.weight, table.scale  # the same Parameters: still tied

    def forward(self, idx):
        return F.embedding(idx, self.weight).to(self.scale.dtype) * self.scale[idx].unsqueeze(-1)


def quantize_int8(model: nn.Module) -> nn.Module:
    """model (a GPT, float weights) in place: its Linear layers Int8Linear, the tied embedding an
    Int8Embedding of the output layer's table, everything else (layer norms, positions) ACT_DTYPE."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, Int8Linear.from_float(child))
    model.transformer.wte = Int8Embedding(model.lm_head)
    return model.to(ACT_DTYPE)


def dequantize_state(state: dict) -> dict:
    """A state_dict saved from an int8 model as float32 weights a float model loads: each int8
    X.weight with its X.scale becomes q * scale (the scales dropped), other tensors float32."""
    out = {}
    for key, value in state.items():
        stem = key.removesuffix(".weight")
        if key.endswith(".scale") and state.get(key.removesuffix(".scale") + ".weight") is not None:
            continue
        if key.endswith(".weight") and value.dtype == torch.int8:
            out[key] = dequantize_rows(value, state[stem + ".scale"])
        else:
            out[key] = value.float() if value.is_floating_point() else value
    return out


@torch.no_grad()
def int8_error(device: str = "cpu") -> str | None:
    """Why int8 cannot run on device, or None: the kernel is tried once on a small product and
    compared with the dequantized one (a CPU without it, or a device torch has no kernel for)."""
    if not device.startswith("cpu"):
        return f"int8 runs on the CPU only (torch._weight_int8pack_mm); on {device} use bf16 or fp16"
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(24, 32, generator=g), torch.randn(3, 32, generator=g).to(ACT_DTYPE)
    layer = Int8Linear(*quantize_rows(w))
    try:
        got = layer(x).float()
    except (RuntimeError, NotImplementedError) as e:
        return f"int8 does not run on this CPU ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
    want = x.float() @ dequantize_rows(layer.weight, layer.scale).t()
    if not torch.allclose(got, want, rtol=0.02, atol=0.05 * want.abs().max().item()):
        return "int8 gives wrong products on this CPU (torch._weight_int8pack_mm checked against float)"
    return None
