"""``orbit serve MODEL [--adapter DIR] [--port N]``: the builtin engine over HTTP (SGLang's native subset)."""

from __future__ import annotations

import typer

from orbit_cli.console import say
from orbit_core.errors import OrbitError
from orbit_core.rollout.serve import AdapterServer, RequestError, make_http_server


def serve(
    model: str = typer.Argument(..., help="HF checkpoint dir (bf16/fp32 or compressed-tensors) or embedded:NAME."),
    adapter: str = typer.Option(None, "--adapter", "-a", help="Load this `orbit train` checkpoint or run dir at start."),
    adapter_name: str = typer.Option("default", "--adapter-name", help="The name requests use as lora_path."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on."),
    port: int = typer.Option(30000, "--port", help="Port to listen on (0 picks a free one)."),
    dtype: str = typer.Option("float32", "--dtype", help="float32, bfloat16 or float16."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda[:N]."),
) -> None:
    """Serve generation with logprobs and named LoRA/OFT adapters over HTTP (/generate, /load_lora_adapter, ...)."""
    if dtype not in ("float32", "bfloat16", "float16"):
        raise OrbitError(f"--dtype {dtype} is not one of float32, bfloat16, float16", "pick one of them")
    server = AdapterServer(model, dtype=dtype, device=device, log=say)
    if adapter:
        try:
            server.load(adapter_name, adapter)
        except RequestError as err:  # its text may carry the loader's own fix already
            fix = None if " -- " in str(err) else "pass a checkpoint or run directory written by `orbit train`"
            raise OrbitError(str(err), fix) from None
    try:
        http = make_http_server(server, host, port)
    except OSError as err:
        raise OrbitError(f"cannot listen on {host}:{port} ({err.strerror})", "pick another --port") from None
    say(f"serving {model} on http://{host}:{http.server_address[1]}"
        + (f" with adapter {adapter_name!r}" if adapter else ""))
    try:
        http.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        http.server_close()
