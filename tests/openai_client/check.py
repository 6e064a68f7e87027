"""The official `openai` Python client against a running flamingo server.

Usage: python check.py BASE_URL API_KEY MODEL IMAGE_PATH
Run by crates/flamingo-server/tests/openai_client.rs (which starts the server); exits non-zero
on the first failed check. Requirements: tests/openai_client/requirements.txt.
"""

import base64
import sys

import openai
from openai import OpenAI


def main() -> None:
    base, key, model, image_path = sys.argv[1:5]
    with open(image_path, "rb") as f:
        url = "data:image/png;base64," + base64.b64encode(f.read()).decode()
    client = OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0)

    # Models list.
    ids = [m.id for m in client.models.list()]
    assert ids == [model], ids

    messages = [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "Output:"}]},
        {"role": "assistant", "content": "two cats."},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url, "detail": "auto"}}, {"type": "text", "text": "Output:"}]},
    ]

    # Non-streaming chat with images.
    r = client.chat.completions.create(model=model, messages=messages, max_tokens=12, logprobs=True, top_logprobs=2)
    c = r.choices[0]
    assert r.object == "chat.completion", r.object
    assert c.message.role == "assistant"
    assert isinstance(c.message.content, str)
    assert c.finish_reason in ("stop", "length"), c.finish_reason
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.usage.completion_tokens >= 1
    assert isinstance(r.usage.prompt_tokens_details.cached_tokens, int)
    assert c.logprobs is not None and all(len(t.top_logprobs) == 2 for t in c.logprobs.content)

    # Streaming chat with usage: the same text.
    stream = client.chat.completions.create(
        model=model, messages=messages, max_tokens=12, stream=True, stream_options={"include_usage": True}
    )
    text, finish, usage, ids_seen = "", None, None, set()
    for chunk in stream:
        ids_seen.add(chunk.id)
        if chunk.usage is not None:
            usage = chunk.usage
        for ch in chunk.choices:
            text += ch.delta.content or ""
            finish = ch.finish_reason or finish
    assert text == c.message.content, (text, c.message.content)
    assert finish == c.finish_reason
    assert usage is not None and usage.completion_tokens == r.usage.completion_tokens
    assert len(ids_seen) == 1

    # Extensions through extra_body; the completions endpoint with images.
    r = client.chat.completions.create(model=model, messages=messages, max_tokens=4, extra_body={"num_beams": 2, "repetition_penalty": 1.1})
    assert r.choices[0].finish_reason in ("stop", "length")
    r = client.completions.create(model=model, prompt="<image>Output:", max_tokens=4, extra_body={"images": [url]})
    assert r.object == "text_completion" and isinstance(r.choices[0].text, str)

    # Few-shot: a demonstration set registered once (client.post), used by id (extra_body) and
    # equal to the examples inline; candidates scored with /v1/score.
    example = [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "Output:"}]},
        {"role": "assistant", "content": "a picture."},
    ]
    card = client.post("/demonstrations", body={"name": "one-shot", "examples": [{"messages": example}]}, cast_to=object)
    assert card["object"] == "demonstration_set" and card["id"].startswith("demo-"), card
    inline = client.chat.completions.create(model=model, messages=example + messages, max_tokens=4, logprobs=True)
    by_id = client.chat.completions.create(model=model, messages=messages, max_tokens=4, logprobs=True, extra_body={"demonstrations": {"id": card["id"]}})
    assert by_id.choices[0].message.content == inline.choices[0].message.content
    assert by_id.usage.prompt_tokens == inline.usage.prompt_tokens
    assert by_id.usage.prompt_tokens_details.cached_tokens >= card["prompt_tokens"]
    listed = client.get("/demonstrations", cast_to=object)
    assert [s["id"] for s in listed["data"]] == [card["id"]], listed
    scores = client.post("/score", body={"model": model, "messages": messages, "demonstrations": {"id": card["id"]}, "candidates": ["a cat.", "a dog."]}, cast_to=object)
    assert scores["object"] == "score" and sorted(scores["ranking"]) == [0, 1], scores
    assert all(d["logprob"] < 0 and len(d["token_logprobs"]) == len(d["tokens"]) for d in scores["data"]), scores
    gone = client.delete(f"/demonstrations/{card['id']}", cast_to=object)
    assert gone["deleted"] is True
    try:
        client.chat.completions.create(model=model, messages=messages, extra_body={"demonstrations": {"id": card["id"]}})
        raise AssertionError("a deleted set was served")
    except openai.NotFoundError as e:
        assert e.status_code == 404

    # Errors surface as the client's exception types.
    try:
        client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}]}]
        )
        raise AssertionError("bad base64 accepted")
    except openai.BadRequestError as e:
        assert e.status_code == 400 and "base64" in str(e), e
    try:
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
        raise AssertionError("unknown model accepted")
    except openai.NotFoundError as e:
        assert e.status_code == 404
    bad = OpenAI(base_url=f"{base}/v1", api_key="wrong-key", max_retries=0)
    try:
        bad.models.list()
        raise AssertionError("wrong key accepted")
    except openai.AuthenticationError as e:
        assert e.status_code == 401
    print(f"openai {openai.__version__}: all checks passed")


if __name__ == "__main__":
    main()
