"""``orbit convert``: HF <-> Megatron, adapter export and merge."""

from __future__ import annotations

import typer

from orbit_cli.console import console, not_built
from orbit_core.convert import export_peft_adapter, merge_adapter

app = typer.Typer(help="Convert checkpoints: HF <-> Megatron, adapter export and merge.", no_args_is_help=True)
MEGATRON = "the low-precision base issue: Megatron torch_dist conversion"


@app.command("hf-to-megatron")
def hf_to_megatron(src: str = typer.Argument(..., help="HF checkpoint dir."), out: str = typer.Argument(..., help="Output dir.")) -> None:
    """HF checkpoint -> Megatron torch_dist checkpoint."""
    raise not_built("convert hf-to-megatron", MEGATRON)


@app.command("megatron-to-hf")
def megatron_to_hf(src: str = typer.Argument(..., help="Megatron checkpoint root."), out: str = typer.Argument(..., help="Output dir."),
                   hf_config: str = typer.Option(None, "--hf-config", help="Reference HF config dir.")) -> None:
    """Megatron torch_dist checkpoint -> HF checkpoint."""
    raise not_built("convert megatron-to-hf", MEGATRON)


@app.command("export-adapter")
def export_adapter(run_dir: str = typer.Argument(..., help="Run dir (its latest checkpoint) or a step_* checkpoint dir."),
                   out: str = typer.Argument(..., help="Output dir for the PEFT adapter.")) -> None:
    """Orbit adapter -> PEFT adapter (adapter_config.json + adapter_model.safetensors)."""
    path = export_peft_adapter(run_dir, out)
    console.print(f"PEFT adapter written to {path}")


@app.command("merge-adapter")
def merge_adapter_cmd(base: str = typer.Argument(..., help="Base HF checkpoint dir (or embedded:tiny-arith)."),
                      adapter: str = typer.Argument(..., help="Run dir or step_* checkpoint dir."),
                      out: str = typer.Argument(..., help="Output dir for the merged checkpoint."),
                      dtype: str = typer.Option("bfloat16", "--dtype", help="bfloat16, float16 or float32.")) -> None:
    """Fold an adapter into its base and write a plain HF checkpoint."""
    if dtype not in ("bfloat16", "float16", "float32"):
        raise typer.BadParameter("use bfloat16, float16 or float32", param_hint="--dtype")
    path = merge_adapter(base, adapter, out, dtype)
    console.print(f"merged checkpoint written to {path}")
