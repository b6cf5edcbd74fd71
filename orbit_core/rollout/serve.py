"""``orbit serve``: the builtin engine behind HTTP, speaking a subset of SGLang's native API.

Endpoints (JSON in and out):
  * ``POST /generate``: ``input_ids`` (one list or a batch) or ``text``, ``sampling_params``
    (``max_new_tokens``, ``temperature``, ``top_p``, ``top_k``, ``stop``), ``return_logprob``,
    ``lora_path`` (the name of a loaded adapter; none = the base). Each output has ``text``,
    ``output_ids`` and ``meta_info`` with ``finish_reason``, ``prompt_tokens``,
    ``completion_tokens`` and, when asked, ``output_token_logprobs`` as ``[logprob, token_id, None]``.
  * ``POST /load_lora_adapter`` ``{lora_name, lora_path}``: a PEFT LoRA directory (what SGLang
    loads) or an ``orbit train`` checkpoint or run directory; ``POST /unload_lora_adapter`` ``{lora_name}``.
  * ``GET /health``; ``POST /flush_cache`` frees the KV cache.
A prompt plus ``max_new_tokens`` must fit ``max_position_embeddings`` (400); an engine failure is a
500. Requests are served one at a time (the engine batches within a request). Loaded adapters are kept
as tensors and written into the model before a request that names one, so any number can be
loaded; they must share the first one's method and shape.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import traceback
from pathlib import Path
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch

from orbit_core.config.schema import ModelSection, PeftSection
from orbit_core.convert.peft_export import read_peft_lora
from orbit_core.errors import OrbitError
from orbit_core.peft.base import adapter_disabled, adapter_modules, load_adapter_state_dict
from orbit_core.policy.adapter_files import load_adapter, resolve_adapter_dir
from orbit_core.policy.build import apply_adapter, build_policy
from orbit_core.rollout.engine import BuiltinEngine
from orbit_core.rollout.types import SamplingParams


SAME_KIND = ("method", "rank", "alpha", "oft_block_size")
"""Adapters served together share these (names and shapes are checked tensor by tensor)."""


def is_peft_dir(path: str) -> bool:
    config = Path(path) / "adapter_config.json"
    try:
        return config.is_file() and "peft_type" in json.loads(config.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return False


class RequestError(Exception):
    """A bad request: answered with its status and message, the server goes on."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class AdapterServer:
    def __init__(self, model_path: str, dtype: str = "float32", device: str = "auto", max_running: int = 64,
                 seed: int = 0, log=print):
        policy = build_policy(ModelSection(path=model_path, dtype=dtype, device=device, warmstart_steps=0), None, log)
        self.model, self.tokenizer = policy.model, policy.tokenizer
        self.engine = BuiltinEngine(self.model, self.tokenizer, max_running=max_running, seed=seed)
        self.adapters: dict[str, dict[str, torch.Tensor]] = {}
        self.peft: dict | None = None
        self.active: str | None = None
        self.lock = threading.Lock()

    # -- adapters ---------------------------------------------------------------------------
    def load(self, name: str, path: str) -> None:
        if not name or not path:
            raise RequestError(400, "give lora_name and lora_path")
        try:
            if is_peft_dir(path):
                state, peft = read_peft_lora(path)
            else:
                state, meta = load_adapter(resolve_adapter_dir(path))
                peft = meta.get("peft")
        except OrbitError as err:
            raise RequestError(400, str(err)) from None
        if not isinstance(peft, dict):
            raise RequestError(400, f"{path}: adapter_config.json has no peft section (not written by `orbit train`)")
        kind = {k: peft.get(k) for k in SAME_KIND}
        with self.lock:
            if self.peft is None:
                apply_adapter(self.model, PeftSection(**peft))
                self.model.to(self.engine.device)
                self.peft = kind
            elif kind != self.peft:
                raise RequestError(400, f"{path}: adapter {kind} differs from the loaded ones ({self.peft})")
            try:
                load_adapter_state_dict(self.model, state, path)  # validates names and shapes now
            except OrbitError as err:
                raise RequestError(400, str(err)) from None
            self.adapters[name], self.active = state, name
            self.engine.release()

    def unload(self, name: str) -> None:
        with self.lock:
            if self.adapters.pop(name, None) is None:
                raise RequestError(404, f"no adapter named {name!r} is loaded")
            if self.active == name:
                self.active = None

    # -- generation -------------------------------------------------------------------------
    def generate(self, request: dict[str, Any]) -> list[dict[str, Any]] | dict[str, Any]:
        prompts, single = self._prompts(request)
        sampling = request.get("sampling_params") or {}
        params = self._params(sampling)
        context = self.model.config.max_position_embeddings
        longest = max(len(p) for p in prompts)
        if "max_new_tokens" not in sampling and longest < context:  # the default fits the model's context
            params = dataclasses.replace(params, max_new_tokens=min(params.max_new_tokens, context - longest))
        if longest + params.max_new_tokens > context:  # else the KV cache is sized for it (or fails to be)
            raise RequestError(400, f"a prompt of {longest} tokens plus max_new_tokens={params.max_new_tokens} exceeds "
                                    f"the model's context of {context} tokens (max_position_embeddings)")
        name = request.get("lora_path")
        with self.lock:
            if name is not None and name not in self.adapters:
                raise RequestError(404, f"no adapter named {name!r} is loaded; POST /load_lora_adapter first")
            if name is not None and self.active != name:
                load_adapter_state_dict(self.model, self.adapters[name], name)
                self.active = name
            try:
                if name is None and adapter_modules(self.model):
                    with adapter_disabled(self.model):
                        completions = self.engine.generate(prompts, params)
                else:
                    completions = self.engine.generate(prompts, params)
            except Exception:
                self.engine.release()  # what a failed call (out of memory) held is handed back for the next
                raise
        outputs = [self._output(c, bool(request.get("return_logprob"))) for c in completions]
        return outputs[0] if single else outputs

    def _prompts(self, request: dict[str, Any]) -> tuple[list[list[int]], bool]:
        if "input_ids" in request:
            ids = request["input_ids"]
            single = bool(ids) and isinstance(ids[0], int)
            batch = [ids] if single else ids
            if not batch or not all(isinstance(p, list) and p and all(isinstance(t, int) for t in p) for p in batch):
                raise RequestError(400, "input_ids must be a non-empty list of token ids, or a list of such lists")
            vocab = self.model.config.vocab_size
            if any(t < 0 or t >= vocab for p in batch for t in p):
                raise RequestError(400, f"input_ids hold a token id outside [0, {vocab})")
            return batch, single
        if "text" in request:
            texts = request["text"]
            single = isinstance(texts, str)
            texts = [texts] if single else texts
            if not texts or not all(isinstance(t, str) and t for t in texts):
                raise RequestError(400, "text must be a non-empty string or a list of them")
            return [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts], single
        raise RequestError(400, "give input_ids or text")

    @staticmethod
    def _params(sampling: dict[str, Any]) -> SamplingParams:
        try:
            params = SamplingParams(max_new_tokens=int(sampling.get("max_new_tokens", 128)),
                                    temperature=float(sampling.get("temperature", 1.0)),
                                    top_p=float(sampling.get("top_p", 1.0)), top_k=max(int(sampling.get("top_k", 0)), 0),
                                    stop=tuple([sampling["stop"]] if isinstance(sampling.get("stop"), str)
                                               else sampling.get("stop") or ()))
        except (TypeError, ValueError) as err:
            raise RequestError(400, f"bad sampling_params: {err}") from None
        if params.max_new_tokens <= 0 or params.temperature < 0 or not 0 < params.top_p <= 1:
            raise RequestError(400, "sampling_params need max_new_tokens > 0, temperature >= 0 and top_p in (0, 1]")
        return params

    @staticmethod
    def _output(completion, with_logprobs: bool) -> dict[str, Any]:
        reason = {"eos": "stop", "stop": "stop", "length": "length"}[completion.finish_reason]
        meta: dict[str, Any] = {"finish_reason": {"type": reason}, "prompt_tokens": len(completion.prompt_ids),
                                "completion_tokens": len(completion.token_ids)}
        if with_logprobs:
            meta["output_token_logprobs"] = [[lp, tok, None] for lp, tok in zip(completion.logprobs, completion.token_ids)]
        return {"text": completion.text, "output_ids": completion.token_ids, "meta_info": meta}


def make_http_server(server: AdapterServer, host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format, *args):  # quiet: the CLI prints what matters
            pass

        def _reply(self, status: int, body: Any) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path in ("/health", "/health_generate"):
                self._reply(200, {"status": "ok"})
            else:
                self._reply(404, {"error": f"no GET {self.path}"})

        def do_POST(self) -> None:
            try:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                if not isinstance(body, dict):
                    raise RequestError(400, "the request body must be a JSON object")
                if self.path == "/generate":
                    self._reply(200, server.generate(body))
                elif self.path == "/load_lora_adapter":
                    server.load(str(body.get("lora_name") or ""), str(body.get("lora_path") or ""))
                    self._reply(200, {"success": True, "loaded_adapters": sorted(server.adapters)})
                elif self.path == "/unload_lora_adapter":
                    server.unload(str(body.get("lora_name") or ""))
                    self._reply(200, {"success": True, "loaded_adapters": sorted(server.adapters)})
                elif self.path == "/flush_cache":
                    with server.lock:
                        server.engine.release()
                    self._reply(200, {"success": True})
                else:
                    self._reply(404, {"error": f"no POST {self.path}"})
            except json.JSONDecodeError:
                self._reply(400, {"success": False, "error": "the request body is not JSON"})
            except RequestError as err:
                self._reply(err.status, {"success": False, "error": str(err)})
            except Exception as err:  # an engine failure (out of memory...): the client gets a reply, the log the trace
                traceback.print_exc()
                self._reply(500, {"success": False, "error": f"{type(err).__name__}: {str(err)[:300]}"})

    return ThreadingHTTPServer((host, port), Handler)
