"""Export a MiniGLM checkpoint to the Hugging Face format: a GPT2LMHeadModel folder (config.json,
model.safetensors, generation_config.json, tokenizer.json, tokenizer_config.json with the chat
template of an SFT model, README.md) that transformers, vLLM and llama.cpp's converter read.

    python export.py --out_dir=out-cpu-sft --to=hf-cpu-sft
    python export.py --out_dir=out-cpu-sft-int8 --to=hf-cpu-sft --overwrite=True   # int8: dequantized
    python export.py --out_dir=out-cpu-lora --to=hf-cpu-lora     # LoRA: merged into its base (out-cpu)
    python -c "from transformers import pipeline; print(pipeline('text-generation', 'hf-cpu-sft')('床前明月光'))"

The work is in hf_export.py (README.md, "Export to the Hugging Face format": loading, serving, converting).
"""
import sys

from configurator import configure
from hf_export import FILES, export

# ----------------------------------------------------------------------------- defaults
out_dir = "out-sft"         # the checkpoint: an out_dir (its ckpt.pt) or a .pt file
to = ""                     # the folder to write
overwrite = False           # replace a folder that is not empty
lora_base = ""              # a LoRA checkpoint's base (ckpt.pt or out_dir), if it is no longer where it was
# -----------------------------------------------------------------------------

if __name__ == "__main__":
    configure(globals())
    if not to:
        sys.exit("--to=PATH: the folder to write the Hugging Face model to")
    try:
        written = export(out_dir, to, overwrite, lora_base)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(str(e))
    print(f"wrote {written}: {', '.join(FILES)}")
    print(f"load it: AutoModelForCausalLM.from_pretrained({str(written)!r}), AutoTokenizer.from_pretrained(...)")
