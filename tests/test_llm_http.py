"""Stage 03 (LLM backends), HTTP: real servers on 127.0.0.1 started by the tests, no mocked client.

(a) `serve()` a real TransformersLLM(SmolLM2) and read it through `OpenAILLM` (and the `openai` client);
(b) a scripted server (below) for retries, backoff, Retry-After, auth/404/connection errors, timeouts,
    concurrency and key redaction.
"""
import json, logging, socket, threading, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from usermirror_nb.config import LLMConfig
from usermirror_nb.llm import (LLMAuthError, LLMConnectionError, LLMError, LLMNotFoundError, OpenAILLM, Sampling,
                               TransformersLLM)
from usermirror_nb.server import serve

SECRET = "sk-test-UNMISTAKABLE-7f3a9c1e"
CONV = [{"role": "system", "content": "You simulate a movie viewer. End with Behavior: [letter of the chosen movie]."},
        {"role": "user", "content": "History: Fargo (5/5), Heat (4/5), Casino (2/5).\nExposure list:\n[A] Se7en\n[B] Babe\n"
                                    "[C] Clueless\n[D] Sabrina\nWhich one does the viewer choose?"}]
CONTS = ["Behavior: [", "Stimulus: a free evening.\nKnowledge: liked crime films.\nEvaluation: logical.\nBehavior: ["]


def cfg(base_url, **kw):
    return LLMConfig(backend="openai", model=kw.pop("model", "m"), base_url=base_url, **{"timeout_s": 3.0, "max_retries": 2, **kw})


# ---------------------------------------------------------------------------------------------------------------
# (a) a real local model behind serve()

@pytest.fixture(scope="module")
def local():
    llm = TransformersLLM(LLMConfig(model="smollm2-135m-instruct", dtype="float32", batch_size=4))   # exact comparisons: fp32 (auto is bf16 on a bf16 CPU)
    srv, url = serve(llm, model_name="smollm2")
    yield llm, url
    srv.shutdown(); srv.server_close(); llm.close()


def test_served_model_generates_like_local(local):
    llm, url = local
    with OpenAILLM(cfg(url, model="smollm2", timeout_s=60)) as h:
        greedy = Sampling(temperature=0, max_new_tokens=12)
        assert h.generate([CONV], sampling=greedy) == llm.generate([CONV], sampling=greedy)
        # assistant prefill through continue_final_message
        assert (h.generate([CONV], sampling=greedy, assistant_prefix="Stimulus:")
                == llm.generate([CONV], sampling=greedy, assistant_prefix="Stimulus:"))
        got = h.generate([CONV, CONV], n=2, sampling=Sampling(max_new_tokens=8, seed=1, stop_regex=r"\w+"))
        assert [len(x) for x in got] == [2, 2] and all(t for x in got for t in x)
        assert h.retries == 0


def test_served_choice_probs_match_local(local):
    llm, url = local
    loc = llm.choice_probs([CONV], [CONTS], k=4)[0]
    with OpenAILLM(cfg(url, model="smollm2", timeout_s=60, top_logprobs=20)) as h:
        rem = h.choice_probs([CONV], [CONTS], k=4)[0]
    assert rem.probs.shape == (2, 4)
    np.testing.assert_allclose(rem.probs.sum(1), 1.0, atol=1e-12)
    for r, l in zip(rem.probs, loc.probs):
        assert list(np.argsort(-r)) == list(np.argsort(-l))          # same order of the letters
    # all four letters are among the top 20 here, so the HTTP numbers are exact up to float noise
    np.testing.assert_allclose(rem.probs, loc.probs, atol=1e-3)
    np.testing.assert_allclose(rem.letter_mass, loc.letter_mass, atol=1e-3)


def test_served_plain_completions(local):
    llm, url = local
    plain = TransformersLLM(LLMConfig(model="smollm2-135m-instruct", template="plain", batch_size=4), model=llm.model, tokenizer=llm.tok)
    with OpenAILLM(cfg(url, model="smollm2", template="plain", timeout_s=60)) as h:
        assert h.template == "plain"
        rem = h.choice_probs([CONV], [CONTS], k=4)[0]
        greedy = Sampling(temperature=0, max_new_tokens=8)
        assert h.generate([CONV], sampling=greedy, assistant_prefix="Stimulus:") == plain.generate([CONV], sampling=greedy, assistant_prefix="Stimulus:")
    np.testing.assert_allclose(rem.probs, plain.choice_probs([CONV], [CONTS], k=4)[0].probs, atol=1e-3)


def test_openai_client_and_models_endpoint(local):
    import httpx, openai
    _, url = local
    assert httpx.get(f"{url}/models").json()["data"][0]["id"] == "smollm2"
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60)
    r = client.chat.completions.create(model="smollm2", messages=CONV, max_tokens=1, logprobs=True, top_logprobs=5, temperature=0)
    assert len(r.choices[0].logprobs.content[0].top_logprobs) == 5
    with pytest.raises(LLMNotFoundError, match="gpt-nope"):
        OpenAILLM(cfg(url, model="gpt-nope", max_retries=0)).generate([CONV])


def test_serve_with_key(local, monkeypatch):
    llm, _ = local
    monkeypatch.setenv("UM_SERVE_KEY", SECRET)
    srv, url = serve(llm, model_name="smollm2", api_key_env="UM_SERVE_KEY")
    try:
        with OpenAILLM(cfg(url, model="smollm2", api_key_env="UM_SERVE_KEY", timeout_s=60)) as h:
            assert len(h.generate([CONV], sampling=Sampling(temperature=0, max_new_tokens=2))[0]) == 1
        monkeypatch.setenv("UM_WRONG_KEY", "sk-wrong-" + SECRET[::-1])
        with pytest.raises(LLMAuthError, match="UM_WRONG_KEY") as ei:
            OpenAILLM(cfg(url, model="smollm2", api_key_env="UM_WRONG_KEY")).generate([CONV])
        assert SECRET[::-1] not in str(ei.value)
    finally:
        srv.shutdown(); srv.server_close()


# ---------------------------------------------------------------------------------------------------------------
# (b) a scripted server: each request takes the next scripted answer (the last one repeats)

OK_BODY = {"id": "x", "object": "chat.completion", "choices": [{"index": 0, "message": {"role": "assistant", "content": "Behavior: [B] done"},
                                                                 "finish_reason": "stop"}]}


class Scripted(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a): pass

    def do_POST(self):
        srv = self.server
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
        with srv.lock:
            srv.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body, "t": time.time()})
            status, headers, payload, delay = srv.script[min(len(srv.requests) - 1, len(srv.script) - 1)]
            srv.inflight += 1; srv.max_inflight = max(srv.max_inflight, srv.inflight)
        try:
            if delay: time.sleep(delay)
            b = json.dumps(payload).encode()
            self.send_response(status)
            for k, v in headers.items(): self.send_header(k, v)
            self.send_header("Content-Type", "application/json"); self.send_header("Content-Length", str(len(b))); self.end_headers()
            self.wfile.write(b)
        except (BrokenPipeError, ConnectionResetError): pass
        finally:
            with srv.lock: srv.inflight -= 1


@pytest.fixture
def scripted():
    servers = []

    def start(*script):
        srv = ThreadingHTTPServer(("127.0.0.1", 0), Scripted)
        srv.daemon_threads = True
        srv.script, srv.requests, srv.lock, srv.inflight, srv.max_inflight = list(script), [], threading.Lock(), 0, 0
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return srv, f"http://127.0.0.1:{srv.server_address[1]}/v1"
    yield start
    for s in servers: s.shutdown(); s.server_close()


def ok(delay=0.0): return (200, {}, OK_BODY, delay)


def test_429_then_success_counts_retries(scripted):
    srv, url = scripted((429, {"Retry-After": "0"}, {"error": {"message": "slow down"}}, 0),
                        (429, {"Retry-After": "0"}, {"error": {"message": "slow down"}}, 0), ok())
    with OpenAILLM(cfg(url, max_retries=3), backoff_base=5.0) as h:     # Retry-After: 0 wins over the 5 s backoff
        t0 = time.time()
        out = h.generate([CONV], sampling=Sampling(stop_regex=r"Behavior:\s*\[[A-Z]\]"))
        assert time.time() - t0 < 2.0
        assert out == [["Behavior: [B]"]]                  # trimmed client-side at the stop match
        assert h.retries == 2 and len(srv.requests) == 3
    req = srv.requests[-1]["body"]
    assert req["model"] == "m" and req["messages"] == CONV and req["n"] == 1 and "stop" not in req


def test_500_forever_fails_after_max_retries(scripted):
    srv, url = scripted((500, {}, {"error": {"message": "engine crashed"}}, 0))
    with OpenAILLM(cfg(url, max_retries=2), backoff_base=0.05) as h:
        with pytest.raises(LLMError, match=r"HTTP 500.*engine crashed.*after 3 attempts \(max_retries=2\)"):
            h.generate([CONV])
        assert h.retries == 2 and len(srv.requests) == 3
    gaps = np.diff([r["t"] for r in srv.requests])
    assert (gaps >= 0.02).all()                               # backed off between attempts (0.05 * 2^a * U(0.5, 1.5))


def test_401_names_the_variable_and_never_the_key(scripted, monkeypatch, caplog, capsys):
    monkeypatch.setenv("UM_TEST_KEY", SECRET)
    srv, url = scripted((401, {}, {"error": {"message": f"Incorrect API key provided: {SECRET}"}}, 0))
    caplog.set_level(logging.DEBUG)
    h = OpenAILLM(cfg(url, api_key_env="UM_TEST_KEY"))
    with pytest.raises(LLMAuthError) as ei:
        h.generate([CONV])
    msg = str(ei.value)
    assert "authentication failed" in msg and "UM_TEST_KEY" in msg and "***" in msg   # the echoed key is redacted
    assert srv.requests[0]["auth"] == f"Bearer {SECRET}"                              # ... but it was sent
    assert len(srv.requests) == 1                                                     # auth errors are not retried
    print(repr(h), repr(ei.value))
    logging.getLogger("usermirror_nb.llm").warning(f"{h!r} {ei.value}")
    h.close()
    out, err = capsys.readouterr()
    for text in (msg, repr(ei.value), repr(h), str(ei.value.args), caplog.text, out, err):
        assert SECRET not in text


def test_404_names_model_and_url(scripted):
    srv, url = scripted((404, {}, {"error": {"message": "The model `m-missing` does not exist."}}, 0))
    with pytest.raises(LLMNotFoundError) as ei:
        OpenAILLM(cfg(url, model="m-missing")).choice_probs([CONV], [CONTS[:1]], k=4)
    assert "m-missing" in str(ei.value) and f"{url}/chat/completions" in str(ei.value)
    assert srv.requests[0]["body"]["continue_final_message"] is True and srv.requests[0]["body"]["max_tokens"] == 1


def test_connection_refused_names_base_url():
    with socket.socket() as s:                    # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    h = OpenAILLM(cfg(url, max_retries=1), backoff_base=0.01)
    with pytest.raises(LLMConnectionError, match="connection refused") as ei:
        h.generate([CONV])
    assert url in str(ei.value) and "serve" in str(ei.value) and h.retries == 1


def test_missing_env_var_names_the_variable(monkeypatch):
    monkeypatch.delenv("UM_ABSENT_KEY", raising=False)
    with pytest.raises(LLMError, match="UM_ABSENT_KEY"):
        OpenAILLM(cfg("http://127.0.0.1:9/v1", api_key_env="UM_ABSENT_KEY"))


def test_timeout_and_400(scripted):
    srv, url = scripted(ok(delay=1.5))
    with pytest.raises(LLMConnectionError, match=r"no answer within timeout_s=0.3"):
        OpenAILLM(cfg(url, timeout_s=0.3, max_retries=0)).generate([CONV])
    srv2, url2 = scripted((400, {}, {"error": {"message": "continue_final_message is not supported"}}, 0))
    with pytest.raises(LLMError, match="OpenAI proper does not support it.*continue_final_message is not supported"):
        OpenAILLM(cfg(url2)).generate([CONV], assistant_prefix="Stimulus:")
    assert len(srv2.requests) == 1                                                    # 4xx other than 429: no retry


def test_concurrency_limit_and_topping_up_n(scripted):
    srv, url = scripted(ok(delay=0.15))
    with OpenAILLM(cfg(url, max_concurrency=2)) as h:
        out = h.generate([CONV] * 6, n=2, sampling=Sampling(seed=10))     # the server returns 1 choice: topped up to 2
    assert [len(x) for x in out] == [2] * 6
    assert srv.max_inflight == 2 and len(srv.requests) == 12
    seeds = sorted({r["body"]["seed"] for r in srv.requests})
    assert seeds[:6] == [10, 11, 12, 13, 14, 15]                           # seed + conversation index


def test_missing_letters_in_top_logprobs(scripted):
    lp = lambda pairs: {"id": "x", "choices": [{"index": 0, "message": {"role": "assistant", "content": "A"}, "logprobs": {"content": [
        {"token": pairs[0][0], "logprob": pairs[0][1], "top_logprobs": [{"token": t, "logprob": l} for t, l in pairs]}]}}]}
    srv, url = scripted((200, {}, lp([("A", np.log(0.6)), (" B", np.log(0.2)), ("the", np.log(0.15))]), 0),
                        (200, {}, lp([("the", np.log(0.9))]), 0))
    h = OpenAILLM(cfg(url, max_concurrency=1, top_logprobs=3))
    cp = h.choice_probs([CONV], [CONTS[:1]], k=3)[0]                       # C missing: min(leftover 0.05, smallest 0.15)
    np.testing.assert_allclose(cp.probs[0], np.array([0.6, 0.2, 0.05]) / 0.85)
    np.testing.assert_allclose(cp.letter_mass, [0.8])
    assert srv.requests[0]["body"]["top_logprobs"] == 3 and srv.requests[0]["body"]["logprobs"] is True
    with pytest.raises(LLMError, match="conversation 0, continuation 0: none of the letters"):
        h.choice_probs([CONV], [CONTS[:1]], k=3)


def test_a_literal_stop_is_sent_to_the_server(scripted):
    "#11.10: stop strings reached no server, so every staged field ran to its token limit there."
    srv, url = scripted(ok())
    with OpenAILLM(cfg(url)) as h:
        h.generate([CONV], sampling=Sampling(stop_regex=r"\n", max_new_tokens=24))
        h.generate([CONV], sampling=Sampling(stop_regex=r"Behavior:\s*\[[A-Z]\]"))
    assert srv.requests[0]["body"]["stop"] == ["\n"] and "stop" not in srv.requests[1]["body"]
