"""``orbit convert``: HF <-> Megatron, adapter export and merge."""

from __future__ import annotations

import typer

from orbit_cli.console import say
from orbit_core.convert import export_peft_adapter, merge_adapter
from orbit_core.convert.megatron import hf_to_megatron as hf_to_megatron_core
from orbit_core.convert.megatron import megatron_to_hf as megatron_to_hf_core

app = typer.Typer(help="Convert checkpoints: HF <-> Megatron, adapter export and merge.", no_args_is_help=True)


@app.command("hf-to-megatron")
def hf_to_megatron(src: str = typer.Argument(..., help="HF checkpoint dir."), out: str = typer.Argument(..., help="Output dir.")) -> None:
    """HF checkpoint -> Megatron torch_dist checkpoint (iter_0000000 + latest_checkpointed_iteration.txt)."""
    say(f"Megatron checkpoint written to {hf_to_megatron_core(src, out)}")


@app.command("megatron-to-hf")
def megatron_to_hf(src: str = typer.Argument(..., help="Megatron checkpoint root."), out: str = typer.Argument(..., help="Output dir."),
                   hf_config: str = typer.Option(None, "--hf-config", help="HF checkpoint dir whose config.json (and tokenizer) to use; default: the config stored by hf-to-megatron.")) -> None:
    """Megatron torch_dist checkpoint -> HF safetensors checkpoint (resolves latest_checkpointed_iteration.txt)."""
    say(f"HF checkpoint written to {megatron_to_hf_core(src, out, hf_config)}")


@app.command("export-adapter")
def export_adapter(run_dir: str = typer.Argument(..., help="Run dir (its latest checkpoint) or a step_* checkpoint dir."),
                   out: str = typer.Argument(..., help="Output dir for the PEFT adapter.")) -> None:
    """Orbit adapter -> PEFT adapter (adapter_config.json + adapter_model.safetensors)."""
    path = export_peft_adapter(run_dir, out)
    say(f"PEFT adapter written to {path}")


@app.command("merge-adapter")
def merge_adapter_cmd(base: str = typer.Argument(..., help="Base HF checkpoint dir (or embedded:tiny-arith)."),
                      adapter: str = typer.Argument(..., help="Run dir or step_* checkpoint dir."),
                      out: str = typer.Argument(..., help="Output dir for the merged checkpoint."),
                      dtype: str = typer.Option("bfloat16", "--dtype", help="bfloat16, float16 or float32.")) -> None:
    """Fold an adapter into its base and write a plain HF checkpoint."""
    if dtype not in ("bfloat16", "float16", "float32"):
        raise typer.BadParameter("use bfloat16, float16 or float32", param_hint="--dtype")
    path = merge_adapter(base, adapter, out, dtype)
    say(f"merged checkpoint written to {path}")
