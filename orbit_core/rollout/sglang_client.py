"""The ``sglang`` rollout backend's side of the wire: SGLang's native HTTP API, several servers.

Generation goes through ``POST /generate`` with token ids in and token ids plus per-token logprobs
out; adapters are loaded and unloaded by name through ``/load_lora_adapter`` and
``/unload_lora_adapter``. Each request's prompts go to the servers with the fewest samples in
flight. ``orbit serve`` speaks the same subset, which is what the tests run against.
"""

from __future__ import annotations

import http.client
import json
import shutil
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from orbit_core.errors import OrbitError
from orbit_core.rollout.types import Completion, SamplingParams


class SGLangServer:
    def __init__(self, url: str, timeout_s: float):
        self.url, self.timeout_s = url.rstrip("/"), timeout_s
        """Each call's limit; for ``/generate``, the limit on the server not answering ``/health``."""
        self.health_answers = 0
        """``/health`` answers during ``/generate`` calls (a Ray actor's progress counts them)."""
        self.in_flight = 0
        self.tokens = 0
        self.busy_s = 0.0
        self.sync_ms = 0.0
        self.version: int | None = None

    def post(self, path: str, body: dict) -> dict | list:
        request = urllib.request.Request(self.url + path, data=json.dumps(body).encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as err:
            detail = err.read().decode(errors="replace")[:300]
            if path.endswith("lora_adapter"):
                _check_lora_answer(self.url, _json_or_text(detail))
            raise self._answered(path, err.code, detail) from None
        except (urllib.error.URLError, TimeoutError, OSError) as err:
            raise self._unreachable(err) from None

    def _answered(self, path: str, status: int, detail: str) -> OrbitError:
        return OrbitError(f"rollout server {self.url}{path} answered {status}: {detail}",
                          "check the server's log; the run stops after saving its last step")

    def _unreachable(self, err: Exception) -> OrbitError:
        return OrbitError(f"rollout server {self.url} is unreachable ({err})",
                          "start it, or fix rollout.sglang_urls; the run stops after saving its last step")

    def generate(self, body: dict) -> dict | list:
        """``POST /generate``, timed by the server's liveness, not by the request's length.

        The answer comes when the share's longest sample ends, which may be long after any fixed
        limit. So the answer is awaited without one while a watchdog asks ``GET /health`` every
        quarter of ``timeout_s`` (at most 10 s). A server that leaves ``/health`` unanswered for
        ``timeout_s`` has the request's connection shut, which ends the wait with an error."""
        parts = urllib.parse.urlsplit(self.url)
        kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        connection = kind(parts.hostname, parts.port, timeout=self.timeout_s)
        failed: list[str] = []
        stop = threading.Event()

        def watch(sock) -> None:
            answered = time.monotonic()
            while not stop.wait(min(10.0, self.timeout_s / 4)):
                try:
                    left = max(0.1, self.timeout_s - (time.monotonic() - answered))
                    with urllib.request.urlopen(self.url + "/health", timeout=left) as response:
                        response.read()
                    answered = time.monotonic()
                    self.health_answers += 1
                except (urllib.error.URLError, TimeoutError, OSError) as err:
                    if time.monotonic() - answered > self.timeout_s and not stop.is_set():
                        failed.append(str(err))
                        try:
                            sock.shutdown(socket.SHUT_RDWR)
                        except OSError:
                            pass
                        return

        try:
            connection.request("POST", parts.path + "/generate", body=json.dumps(body).encode(),
                               headers={"Content-Type": "application/json"})
            connection.sock.settimeout(None)  # the watchdog bounds this wait
            threading.Thread(target=watch, args=(connection.sock,), daemon=True, name="orbit-sglang-health").start()
            response = connection.getresponse()
            status, data = response.status, response.read()
        except (OSError, http.client.HTTPException) as err:
            if failed:
                raise OrbitError(f"rollout server {self.url} left /health unanswered for {self.timeout_s:g} s while "
                                 f"generating ({failed[0]})", "check the server (its log, its GPU); the run stops "
                                 "after saving its last step") from None
            raise self._unreachable(err) from None
        finally:
            stop.set()
            connection.close()
        if status >= 400:
            raise self._answered("/generate", status, data.decode(errors="replace")[:300])
        return json.loads(data)


class SGLangEngines:
    """A ``RolloutBackend`` over one or more SGLang-API servers, all serving adapter ``lora_name``."""
    name = "SGLang-API servers"

    def __init__(self, urls: list[str], timeout_s: float):
        self.servers = [SGLangServer(url, timeout_s) for url in urls]
        self.lora_name: str | None = None
        self.version = 0
        self.lock = threading.Lock()
        self.pool = ThreadPoolExecutor(max_workers=max(1, len(self.servers)), thread_name_prefix="orbit-sglang")

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        jobs = [(p, s) for p in range(len(prompts)) for s in range(params.n)]
        shares: dict[int, list[tuple[int, int]]] = {}
        with self.lock:  # least-loaded first, sample by sample
            for job in jobs:
                server = min(range(len(self.servers)), key=lambda i: self.servers[i].in_flight)
                self.servers[server].in_flight += 1
                shares.setdefault(server, []).append(job)
        futures = [self.pool.submit(self._run, i, share, prompts, params) for i, share in shares.items()]
        completions = [c for future in futures for c in future.result()]
        return sorted(completions, key=lambda c: (c.prompt_index, c.sample_index))

    def _run(self, index: int, share: list[tuple[int, int]], prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        server = self.servers[index]
        body = {"input_ids": [prompts[p] for p, _ in share], "return_logprob": True,
                "sampling_params": {"max_new_tokens": params.max_new_tokens, "temperature": params.temperature,
                                    "top_p": params.top_p, "top_k": params.top_k if params.top_k > 0 else -1,
                                    "stop": list(params.stop)}}
        if self.lora_name is not None:
            body["lora_path"] = self.lora_name
        start = time.perf_counter()
        try:
            outputs = server.generate(body)
        finally:
            with self.lock:
                server.in_flight -= len(share)
        server.busy_s += time.perf_counter() - start
        if isinstance(outputs, dict):
            outputs = [outputs]
        if len(outputs) != len(share):
            raise OrbitError(f"rollout server {server.url} returned {len(outputs)} outputs for {len(share)} prompts",
                             "the server does not speak SGLang's /generate")
        completions = []
        for (p, s), out in zip(share, outputs):
            logprobs = [float(entry[0]) for entry in out["meta_info"]["output_token_logprobs"]]
            reason = out["meta_info"]["finish_reason"]
            reason = reason.get("type") if isinstance(reason, dict) else reason
            server.tokens += len(out["output_ids"])
            completions.append(Completion(p, s, list(prompts[p]), list(out["output_ids"]), logprobs, out.get("text", ""),
                                          "length" if reason == "length" else "eos", self.version))
        return completions

    def load(self, name: str, path: str, version: int) -> None:
        """Load adapter ``name`` on every server, then drop the previous one."""
        previous = self.lora_name
        for server in self.servers:
            start = time.perf_counter()
            _check_lora_answer(server.url, server.post("/load_lora_adapter", {"lora_name": name, "lora_path": path}))
            server.sync_ms = (time.perf_counter() - start) * 1e3
            server.version = version
        self.lora_name, self.version = name, version
        if previous is not None and previous != name:
            for server in self.servers:
                _check_lora_answer(server.url, server.post("/unload_lora_adapter", {"lora_name": previous}))

    def publish_peft(self, root: Path, version: int, adapter: dict, peft: dict, targets: list[str],
                     base_model: str) -> int:
        """Write ``adapter`` as PEFT directory ``root/v<version>``, load it on every server under that
        name, and delete the previous version's directory. Returns the bytes written."""
        from orbit_core.convert.peft_export import write_peft_adapter

        directory = root / f"v{version}"
        directory.mkdir(parents=True, exist_ok=True)
        size = write_peft_adapter(directory, adapter, peft, targets, base_model)
        previous = self.lora_name
        self.load(f"v{version}", str(directory), version)
        if previous is not None and previous != f"v{version}":
            shutil.rmtree(root / previous, ignore_errors=True)
        return size

    def close(self) -> None:
        self.pool.shutdown(wait=False)


def _json_or_text(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return {"success": False, "error_message": text}


def _check_lora_answer(url: str, answer) -> None:
    """SGLang answers a failed LoRA load or unload with ``success: false`` and a message."""
    if not isinstance(answer, dict) or answer.get("success", True):
        return
    message = str(answer.get("error_message") or answer.get("error") or answer)[:300]
    if "not enabled" in message.lower() or "enable-lora" in message or "enable_lora" in message:
        raise OrbitError(f"rollout server {url} has LoRA disabled ({message})",
                         "restart it with --enable-lora (and --max-lora-rank at least peft.rank, --lora-target-modules "
                         "covering peft.target_modules)")
    raise OrbitError(f"rollout server {url} refused the adapter: {message}",
                     "check the server's log; the run stops after saving its last step")
