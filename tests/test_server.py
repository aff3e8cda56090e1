"""The OpenAI-compatible test server: vLLM's shapes over the testbed teacher, its faults, instant mode."""

import json
import os
import signal
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest

from reasondistill.chat import completion_ids, prompt_ids
from reasondistill.tasks import get_task
from reasondistill.testing.server import FAULT_KINDS, Faults, serve_in_thread

API_KEY = "test-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
MODEL_TIMEOUT = 120  # seconds: the teacher is fast, but a busy 2-core machine slows torch a lot


@pytest.fixture(scope="module")
def teacher(testbed):
    with serve_in_thread(testbed / "teacher", served_name="teacher", api_key=API_KEY) as server:
        yield server


@pytest.fixture(scope="module")
def client(teacher):
    with httpx.Client(base_url=teacher.base_url, headers=AUTH, timeout=MODEL_TIMEOUT) as client:
        yield client


@pytest.fixture(scope="module")
def messages():
    return get_task("arithmetic").sample("test", 1, seed=1)[0].messages


def test_chat_logprobs_are_the_teachers_own(teacher, client, messages):
    body = {
        "model": "teacher",
        "messages": [m.model_dump() for m in messages],
        "temperature": 0,
        "max_completion_tokens": 200,
        "logprobs": True,
        "top_logprobs": 3,
        "return_tokens_as_token_ids": True,
    }
    answer = client.post("/chat/completions", json=body).json()
    choice = answer["choices"][0]
    assert answer["object"] == "chat.completion" and answer["model"] == "teacher"
    assert choice["finish_reason"] == "stop" and choice["message"]["role"] == "assistant"
    text = choice["message"]["content"]
    content = choice["logprobs"]["content"]
    assert answer["usage"]["completion_tokens"] == len(content)
    for position in content:
        assert position["bytes"] == list(position["token"].encode())
        assert len(position["top_logprobs"]) == 3
        top = [c["logprob"] for c in position["top_logprobs"]]
        assert top == sorted(top, reverse=True)

    # Teacher forcing the returned text gives the same tokens and distribution.
    expected = teacher.generator.score([messages], [text], top_k=3)[0]
    ids = [int(p["token"].removeprefix("token_id:")) for p in content]
    assert ids == expected.token_ids.tolist()
    np.testing.assert_allclose([p["logprob"] for p in content], expected.logprobs, atol=2e-3, rtol=1e-2)
    top_ids = [[int(c["token"].removeprefix("token_id:")) for c in p["top_logprobs"]] for p in content]
    assert top_ids == expected.topk_ids.tolist()

    # Without token ids, the tokens are text pieces that spell the completion (and the end-of-turn token).
    del body["return_tokens_as_token_ids"]
    pieces = [
        p["token"]
        for p in client.post("/chat/completions", json=body).json()["choices"][0]["logprobs"]["content"]
    ]
    assert "".join(pieces[:-1]) == text and pieces[-1] == teacher.generator.tokenizer.eos_token


def test_seeded_requests_repeat_their_completions(client, messages):
    body = {
        "messages": [m.model_dump() for m in messages],
        "n": 2,
        "temperature": 1.0,
        "seed": 5,
        "max_tokens": 24,
    }
    first, second = (client.post("/chat/completions", json=body).json() for _ in range(2))
    texts = [c["message"]["content"] for c in first["choices"]]
    assert len(texts) == 2 and texts == [c["message"]["content"] for c in second["choices"]]
    assert first["usage"] == second["usage"]


def test_completions_prompt_logprobs_follow_vllm(teacher, client, messages):
    tokenizer = teacher.generator.tokenizer
    reply = "<think>\nones: 9 + 1 = 10\n</think>\nThe answer is 10."
    prompt, reply_ids = prompt_ids(tokenizer, [messages])[0], completion_ids(tokenizer, [reply])[0]
    body = {
        "model": "teacher",
        "prompt": prompt + reply_ids,
        "max_tokens": 1,
        "temperature": 0,
        "prompt_logprobs": 2,
    }
    answer = client.post("/completions", json=body).json()
    assert answer["object"] == "text_completion"
    entries = answer["choices"][0]["prompt_logprobs"]
    assert entries[0] is None and len(entries) == len(prompt) + len(reply_ids)
    for token, entry in zip(prompt[1:] + reply_ids, entries[1:], strict=True):
        assert str(token) in entry and all(key.isdigit() for key in entry)
        assert set(entry[str(token)]) == {"logprob", "rank", "decoded_token"}
        ranked = sorted(entry.values(), key=lambda e: e["rank"])
        assert [e["rank"] for e in ranked[:2]] == [1, 2] and ranked[0]["logprob"] >= ranked[1]["logprob"]
    expected = teacher.generator.score([messages], [reply], top_k=2)[0]
    got = [entries[len(prompt) + t][str(token)]["logprob"] for t, token in enumerate(reply_ids)]
    np.testing.assert_allclose(got, expected.logprobs, atol=2e-3, rtol=1e-2)
    assert answer["usage"]["prompt_tokens"] == len(prompt) + len(reply_ids)


def test_completions_logprobs_list_the_sampled_token_and_the_top_k(client):
    body = {"prompt": "What is 2 + 3?", "max_tokens": 6, "seed": 1, "logprobs": 2}
    choice = client.post("/completions", json=body).json()["choices"][0]
    logprobs = choice["logprobs"]
    assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == len(logprobs["top_logprobs"]) == 6
    for token, logprob, top in zip(
        logprobs["tokens"], logprobs["token_logprobs"], logprobs["top_logprobs"], strict=True
    ):
        assert top[token] == logprob and 2 <= len(top) <= 3
    assert choice["finish_reason"] == "length" and choice["prompt_logprobs"] is None
    assert logprobs["text_offset"][0] == 0 and logprobs["text_offset"] == sorted(logprobs["text_offset"])


def test_api_key_is_required(teacher):
    body = {"prompt": "1 + 1", "max_tokens": 1}
    assert httpx.post(f"{teacher.base_url}/completions", json=body).status_code == 401
    wrong = {"Authorization": "Bearer nope"}
    response = httpx.post(f"{teacher.base_url}/completions", json=body, headers=wrong)
    assert response.status_code == 401 and "error" in response.json()
    assert httpx.get(f"{teacher.base_url}/models", headers=AUTH).json()["data"][0]["id"] == "teacher"
    assert httpx.get(teacher.base_url.removesuffix("/v1") + "/health").status_code == 200


@pytest.mark.parametrize(
    "path, body",
    [
        ("/chat/completions", b"not json"),
        ("/chat/completions", b'{"model": "teacher"}'),
        ("/chat/completions", b'{"messages": "hello"}'),
        ("/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "n": "2"}'),
        ("/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}'),
        ("/completions", b'{"prompt": "hi", "temperature": 0, "n": 2}'),
        ("/completions", b'{"prompt": [1, 100000]}'),
        ("/completions", b"[1, 2]"),
    ],
)
def test_bad_bodies_get_400(client, path, body):
    response = client.post(path, content=body)
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_unknown_model_gets_404(client):
    assert client.post("/completions", json={"model": "other", "prompt": "hi"}).status_code == 404


# ---- faults and instant mode ----------------------------------------------------------------------

CHAT = {"messages": [{"role": "user", "content": "What is 6 * 7?"}], "max_tokens": 8}


@pytest.mark.parametrize("kind", FAULT_KINDS)
def test_each_fault_fails_the_first_attempt_only(kind):
    faults = Faults(rate=1.0, kinds=(kind,), retry_after="7", hang_seconds=30, max_faults_per_request=1)
    with (
        serve_in_thread(instant=True, faults=faults) as server,
        httpx.Client(base_url=server.base_url) as client,
    ):
        if kind == "500":
            assert client.post("/chat/completions", json=CHAT).status_code == 500
        elif kind == "429":
            response = client.post("/chat/completions", json=CHAT)
            assert response.status_code == 429 and response.headers["Retry-After"] == "7"
        elif kind == "malformed":
            response = client.post("/chat/completions", json=CHAT)
            assert response.status_code == 200 and response.headers["Content-Type"].startswith(
                "application/json"
            )
            with pytest.raises(json.JSONDecodeError):
                response.json()
        elif kind == "drop":
            with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
                client.post("/chat/completions", json=CHAT)
        else:
            with pytest.raises(httpx.ReadTimeout):
                client.post("/chat/completions", json=CHAT, timeout=0.5)
        # The retry succeeds at once (while a hanging first attempt still waits on the server).
        started = time.monotonic()
        response = client.post("/chat/completions", json=CHAT, timeout=10)
        assert response.status_code == 200 and response.json()["choices"][0]["message"]["content"]
        assert time.monotonic() - started < 5
        assert server.fault_counts == {kind: 1} and server.requests == 2


def test_fault_decisions_are_reproducible_and_bounded():
    faults = Faults(rate=0.5, seed=3)
    decisions = [faults.decide(f"request {i}", 0) for i in range(400)]
    assert decisions == [faults.decide(f"request {i}", 0) for i in range(400)]
    assert 150 < sum(d is not None for d in decisions) < 250
    assert set(decisions) == {None, *FAULT_KINDS}
    assert all(faults.decide(f"request {i}", 2) is None for i in range(400))  # past max_faults_per_request


def test_every_request_succeeds_within_its_fault_budget():
    kinds = ("500", "429", "malformed", "drop")
    with (
        serve_in_thread(instant=True, faults=Faults(rate=1.0, kinds=kinds, seed=1)) as server,
        httpx.Client(base_url=server.base_url) as client,
    ):
        for i in range(20):
            body = {**CHAT, "seed": i}
            outcomes = []
            for _ in range(3):  # two faults at most, then an answer
                try:
                    response = client.post("/chat/completions", json=body)
                    outcomes.append(response.status_code == 200 and bool(response.json()["choices"]))
                except (httpx.TransportError, json.JSONDecodeError):
                    outcomes.append(False)
            assert outcomes == [False, False, True]
        assert set(server.fault_counts) == set(kinds) and sum(server.fault_counts.values()) == 40


def test_poisoned_requests_always_fail():
    with (
        serve_in_thread(instant=True, faults=Faults(poison="BOOM")) as server,
        httpx.Client(base_url=server.base_url) as client,
    ):
        poisoned = {"messages": [{"role": "user", "content": "say BOOM"}]}
        assert [client.post("/chat/completions", json=poisoned).status_code for _ in range(4)] == [500] * 4
        assert client.post("/completions", json={"prompt": "BOOM!"}).status_code == 500
        assert client.post("/chat/completions", json=CHAT).status_code == 200
        assert server.fault_counts == {"poison": 5}


def test_instant_mode_answers_in_vllm_shapes():
    with (
        serve_in_thread(instant=True, served_name="fake") as server,
        httpx.Client(base_url=server.base_url) as client,
    ):
        chat = client.post(
            "/chat/completions",
            json={**CHAT, "n": 2, "logprobs": True, "top_logprobs": 3, "return_tokens_as_token_ids": True},
        ).json()
        assert chat["model"] == "fake" and len(chat["choices"]) == 2
        content = chat["choices"][0]["logprobs"]["content"]
        assert chat["usage"]["completion_tokens"] == 2 * len(content)
        assert all(p["token"].startswith("token_id:") and len(p["top_logprobs"]) == 3 for p in content)

        prompt = [5, 9, 2, 7]
        answer = client.post(
            "/completions", json={"prompt": prompt, "max_tokens": 1, "prompt_logprobs": 2}
        ).json()
        entries = answer["choices"][0]["prompt_logprobs"]
        assert (
            entries[0] is None
            and [str(t) in e for t, e in zip(prompt[1:], entries[1:], strict=True)] == [True] * 3
        )
        assert answer["usage"]["prompt_tokens"] == len(prompt)
        assert client.post("/chat/completions", json={"prompt": "no messages"}).status_code == 400


def test_command_line_server_prints_its_address_and_stops_on_sigterm():
    env = {**os.environ, "RD_TEST_SERVER_KEY": "very-secret"}
    command = [
        sys.executable,
        "-m",
        "reasondistill.testing.server",
        "--instant",
        "--api-key-env",
        "RD_TEST_SERVER_KEY",
    ]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline().strip()
        assert line.startswith("listening on http://127.0.0.1:") and line.endswith("/v1")
        base_url = line.removeprefix("listening on ")
        headers = {"Authorization": "Bearer very-secret"}
        assert (
            httpx.post(f"{base_url}/completions", json={"prompt": "hi"}, headers=headers).status_code == 200
        )
        assert httpx.post(f"{base_url}/completions", json={"prompt": "hi"}).status_code == 401
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 0 and stdout == "" and "very-secret" not in stderr
