"""Any OpenAI-compatible Chat Completions endpoint as the model under evaluation.

`predictor(...)` returns a `predictor.Predict`, so loading the split, resuming, scoring and the
output files are the local evaluation's own. The requests carry the same system instruction and
dialogue our models see (`chat.build_messages`), greedy (temperature 0) or, with
`eval.do_sample`, sampled with eval's temperature, top_p and seed, capped at `eval.max_new_tokens`;
eval's other decoding settings have no Chat Completions equivalent and are refused. Where it is,
how many at once and how patiently come from the config's `api` section. Standard library only: a
few threads and urllib are all this needs.

Money rules: each answer is saved the moment it arrives, so a rerun after a crash or Ctrl-C asks
only for what is missing; on a failure or Ctrl-C, queued requests are dropped, the few already in
flight finish their current attempt (no more retries) and what they bring back is saved. The key
goes in a header and nowhere else: never logged, written, or echoed back from an error message.
"""

from __future__ import annotations

import email.utils
import http.client
import json
import random
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import Future
from dataclasses import dataclass

from samsum_qlora import files
from samsum_qlora.chat import build_messages
from samsum_qlora.config import ApiArgs, Config, EvalArgs
from samsum_qlora.errors import UserError
from samsum_qlora.predictor import Predict, Prediction, Save

DEFAULT_BASE = ApiArgs.base
KEY_ENV = "OPENAI_API_KEY"
RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}  # what the OpenAI clients retry; other 4xx are our fault
USAGE_KEYS = ("prompt_tokens", "completion_tokens", "total_tokens")
# eval's decoding settings a Chat Completions request cannot carry, with their defaults: "off"
NOT_SENDABLE = {
    key: getattr(EvalArgs, key) for key in ("num_beams", "length_penalty", "no_repeat_ngram_size", "repetition_penalty")
}


# --- pure helpers --------------------------------------------------------------------------------


def normalise_base(base: str) -> str:
    """`http(s)://host[:port]/path` without a trailing slash; anything else is refused."""
    base = base.strip().rstrip("/")
    parts = urllib.parse.urlsplit(base)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise UserError(f"api.base (--api-base) must be an http(s) URL such as {DEFAULT_BASE}, got {base!r}")
    if base.endswith("/chat/completions"):
        raise UserError(f"api.base (--api-base) is the API root, e.g. {DEFAULT_BASE}; drop the /chat/completions")
    return base


def needs_key(base: str) -> bool:
    """OpenAI itself always wants a key; local servers (vLLM, Ollama, LiteLLM) often do not."""
    return urllib.parse.urlsplit(base).hostname == "api.openai.com"


def request_body(model: str, messages: list[dict[str, str]], max_tokens: int, decoding: dict | None = None) -> dict:
    """Greedy and capped like our own generation, so the comparison is like for like; with
    `decoding["do_sample"]`, sampled with its temperature, top_p and seed instead."""
    body = {"model": model, "messages": messages, "temperature": 0, "max_tokens": max_tokens}
    if decoding and decoding["do_sample"]:
        body |= {key: decoding[key] for key in ("temperature", "top_p", "seed")}
    return body


def check_decoding(decoding: dict) -> None:
    """Refuse a decoding setting an OpenAI-compatible API has no field for, naming the key."""
    for key, off in NOT_SENDABLE.items():
        if decoding[key] != off:
            raise UserError(
                f"eval.{key}={decoding[key]} cannot be sent to an OpenAI-compatible API (it takes temperature, "
                f"top_p and seed): set eval.{key}={off} for --api-model"
            )


def parse_answer(payload: dict) -> tuple[Prediction, dict[str, int]]:
    """(summary, token usage) from a Chat Completions response; ValueError if it is not one. A
    null content counts as an empty summary, a list of parts as their text parts joined;
    finish_reason "length" as one that did not end."""
    try:
        choice = payload["choices"][0]
        content = choice["message"].get("content")
    except (KeyError, IndexError, TypeError, AttributeError):
        raise ValueError("no choices[0].message in the response") from None
    usage = payload.get("usage") or {}
    if not isinstance(usage, dict):
        raise ValueError(f"usage is {type(usage).__name__} {usage!r:.60}, not an object")
    try:
        used = {k: int(usage.get(k) or 0) for k in USAGE_KEYS}
    except (TypeError, ValueError):
        raise ValueError(f"usage holds something other than token counts: {usage!r:.80}") from None
    ended = choice.get("finish_reason") != "length"
    return Prediction(_text(content).strip(), ended), used


def _text(content) -> str:
    """A message's content: text, null, or parts (only the text parts count: a refusal part is not a
    summary, and it is counted as an empty one)."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list) and all(isinstance(part, dict) for part in content):
        return "".join(p["text"] for p in content if p.get("type") == "text" and isinstance(p.get("text"), str))
    raise ValueError(f"message content is {type(content).__name__} {content!r:.60}, not text")


def retry_delay(
    attempt: int,
    retry_after: str | None = None,
    retry_after_ms: str | None = None,
    *,
    backoff: float,
    max_wait: float,
    jitter: float = 0.0,
) -> float:
    """Seconds to wait after failed attempt number `attempt` (1-based).

    The server's own `retry-after-ms` or `Retry-After` (seconds or an HTTP date) wins; else
    `backoff` doubles per attempt, stretched by `jitter` (0-1) so parallel requests do not retry in
    lockstep. Never more than `max_wait`, never negative."""
    if retry_after_ms:
        try:
            return min(max(float(retry_after_ms) / 1000, 0.0), max_wait)
        except ValueError:
            pass
    if retry_after:
        try:
            return min(max(float(retry_after), 0.0), max_wait)
        except ValueError:
            try:
                when = email.utils.parsedate_to_datetime(retry_after).timestamp()
                return min(max(when - time.time(), 0.0), max_wait)
            except (TypeError, ValueError, IndexError):
                pass  # unparseable: fall back to our own backoff
    return min(backoff * 2 ** (attempt - 1) * (1 + jitter), max_wait)


def redact(text: str, key: str | None) -> str:
    return text.replace(key, "***") if key else text


# --- one request, with retries -------------------------------------------------------------------


class _Stopped(Exception):
    """Another row failed or Ctrl-C was pressed: no further attempts."""


class _Transient(Exception):
    """Worth another attempt: 429, 5xx, timeouts, dropped connections."""

    def __init__(self, reason: str, retry_after: str | None = None, retry_after_ms: str | None = None):
        super().__init__(reason)
        self.retry_after, self.retry_after_ms = retry_after, retry_after_ms


def _error_message(body: bytes) -> str:
    """The `error.message` of an OpenAI-style error body, else its first 200 characters."""
    text = body.decode("utf-8", "replace")
    try:
        err = json.loads(text).get("error")
        text = err.get("message", text) if isinstance(err, dict) else str(err or text)
    except (ValueError, AttributeError):
        pass
    return " ".join(text.split())[:200]


def _post_once(url: str, body: bytes, key: str | None, timeout: float) -> dict:
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            raw = response.read()
    except urllib.error.HTTPError as e:
        try:
            message = _error_message(e.read() or b"")
        except (OSError, http.client.HTTPException):  # the error body itself did not arrive
            message = e.reason or "no details"
        if e.code in RETRY_STATUS:
            raise _Transient(
                f"HTTP {e.code}: {message}", e.headers.get("Retry-After"), e.headers.get("retry-after-ms")
            ) from None
        hint = {
            401: " (check $OPENAI_API_KEY)",
            403: " (check $OPENAI_API_KEY)",
            404: " (check --api-base and --api-model)",
        }.get(e.code, "")
        raise UserError(f"{url} answered HTTP {e.code}{hint}: {message}") from None
    except (TimeoutError, ConnectionError, http.client.HTTPException) as e:
        raise _Transient(f"{type(e).__name__}: {e}" if str(e) else type(e).__name__) from None
    except urllib.error.URLError as e:  # connection refused, DNS, a timeout while connecting
        raise _Transient(f"cannot connect: {e.reason}") from None
    try:
        return json.loads(raw)
    except ValueError:
        raise UserError(f"{url} did not answer JSON: {raw[:200]!r}") from None


@dataclass(frozen=True)
class Patience:
    """How long one request waits for an answer, and how often and how long it retries."""

    timeout: float
    max_attempts: int
    backoff: float = 1.0  # seconds before the first retry, doubled per attempt
    max_wait: float = 60.0  # the longest wait between two attempts


def complete(
    url: str,
    body: dict,
    *,
    key: str | None,
    patience: Patience,
    stop: threading.Event | None = None,
    row: str = "a row",
) -> tuple[Prediction, dict[str, int], int]:
    """One chat completion -> (summary, usage, retries), retrying transient failures with backoff
    until `stop` is set. `row` names the row in an error."""
    stop = stop or threading.Event()
    data = json.dumps(body, ensure_ascii=False).encode("utf-8")
    attempts = patience.max_attempts
    for attempt in range(1, attempts + 1):
        try:
            payload = _post_once(url, data, key, patience.timeout)
            break
        except _Transient as e:
            reason = redact(str(e), key)
            if attempt == attempts:
                raise UserError(
                    f"{url}: gave up after {attempts} attempts ({reason}); rerun the same command "
                    "to resume, finished answers are kept"
                ) from None
            if stop.is_set():
                raise _Stopped(reason) from None
            jitter = random.random() * 0.25
            wait = retry_delay(
                attempt,
                e.retry_after,
                e.retry_after_ms,
                backoff=patience.backoff,
                max_wait=patience.max_wait,
                jitter=jitter,
            )
            print(f"api: {reason}; retry {attempt}/{attempts - 1} in {wait:.1f}s", file=sys.stderr, flush=True)
            if stop.wait(wait):
                raise _Stopped(reason) from None
        except UserError as e:
            raise UserError(redact(str(e), key)) from None
    try:
        answer, usage = parse_answer(payload)
    except ValueError as e:
        raise UserError(f"{url} answered {row} with something that is not a chat completion: {e}") from None
    return answer, usage, attempt - 1


# --- the predictor -------------------------------------------------------------------------------


def predictor(cfg: Config, *, model: str, key: str | None, backoff: float = 1.0, max_wait: float = 60.0) -> Predict:
    """A `predictor.Predict` that asks `api.base`/chat/completions for every row, `api.concurrency`
    at a time, with the task instruction and answer length eval gives our own models.

    Checks everything it can before returning, so a bad option fails before any file is written.
    Returns, for metrics.json, `api_base` and `api_usage`: the token usage of the requests this run
    made (a resumed run counts only its own), the answers received and the retries it took."""
    base = normalise_base(cfg.api.base)
    if needs_key(base) and not key:
        raise UserError(f"{base} needs an API key: export {KEY_ENV}=... (or point --api-base at your own server)")
    instruction, max_tokens, concurrency = cfg.data.task_instruction, cfg.eval.max_new_tokens, cfg.api.concurrency
    decoding = cfg.eval.decoding()
    check_decoding(decoding)
    patience = Patience(cfg.api.timeout, cfg.api.max_attempts, backoff=backoff, max_wait=max_wait)
    url = f"{base}/chat/completions"

    def predict(rows: list[dict], save: Save) -> dict:
        from concurrent.futures import ThreadPoolExecutor

        bodies = [request_body(model, build_messages(r["dialogue"], instruction), max_tokens, decoding) for r in rows]
        # The pool's size is the bound on requests in flight; the rest wait in its queue.
        pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="api")
        stop = threading.Event()
        futures = {
            pool.submit(complete, url, body, key=key, patience=patience, stop=stop, row=_row_name(rows[i])): i
            for i, body in enumerate(bodies)
        }
        try:
            usage = _gather(futures, save, stop, f"asking {model}")
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
        return {"api_base": base, "api_usage": usage}

    return predict


def _row_name(row: dict) -> str:
    return f"row {row['index']} (id {row['id']})"


def _gather(futures: dict[Future, int], save: Save, stop: threading.Event, desc: str) -> dict:
    """Save each answer as it arrives and add up the usage. On a failed row or Ctrl-C: drop what
    has not started, retry nothing, and keep what was paid for."""
    from concurrent.futures import as_completed

    from tqdm.auto import tqdm

    usage = {k: 0 for k in USAGE_KEYS} | {"answers": 0, "retries": 0}
    saved: set = set()

    def keep(future: Future) -> None:  # on this thread only, so `save` and the sums need no lock
        answer, used, retries = future.result()
        # Whole or not at all: a Ctrl-C between the write and the mark would lose a paid answer
        # (marked, never written) or save it twice (written, not marked).
        with files.signals_wait():
            save([futures[future]], [answer])
            saved.add(future)
            for k in USAGE_KEYS:
                usage[k] += used[k]
            usage["answers"] += 1
            usage["retries"] += retries

    try:
        for future in tqdm(as_completed(futures), total=len(futures), desc=desc, unit="row"):
            keep(future)
    except BaseException:
        stop.set()
        for future in futures:
            future.cancel()
        for future in futures:
            if future not in saved and not future.cancelled():
                try:
                    keep(future)
                except Exception:
                    pass
        raise
    return usage
