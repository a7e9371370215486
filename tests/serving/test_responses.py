"""OpenAI's response shapes built from engine deltas (serving/responses.py), without Ray."""

from __future__ import annotations

from raygen.serving.responses import ChatAnswer, TextAnswer
from raygen.serving.runtimes.text import TextDelta, TokenLogprob


def unfiltered(text: str, reason: str | None) -> tuple[str, str | None, bool]:
    return text, reason, False


def test_streamed_offsets_follow_the_tokens_and_the_chosen_token_is_among_the_top():
    """Tokens "xa" then "b" with the stop sequence "ab": the first chunk sends "x" (holding
    "a" back), the second cuts the text there and sends the first token, cut to "x"."""
    answer = TextAnswer("id", "m", 1, unfiltered, buffered=False, logprobs=True, echo=["P"])
    first = answer.step([TextDelta("x", None, 1, [], [TokenLogprob("P", None)])])
    last = answer.step([TextDelta("", "stop", 2, [TokenLogprob("x", -0.5, [("y", -0.1)])])])
    assert first[0]["text"] == "Px" and first[0]["logprobs"]["tokens"] == ["P"]
    logprobs = last[0]["logprobs"]
    assert logprobs["tokens"] == ["x"] and logprobs["text_offset"] == [1]  # after "P"
    assert logprobs["top_logprobs"] == [{"y": -0.1, "x": -0.5}]
    assert last[0]["finish_reason"] == "stop"


def test_chat_logprobs_leave_out_the_end_of_turn_and_a_filtered_choice_has_none():
    tokens = [TokenLogprob("Hi", -0.2, [("Hi", -0.2)]), TokenLogprob("", -0.1, ends=True)]
    answer = ChatAnswer("id", "m", 1, unfiltered, buffered=False, logprobs=True)
    (choice,) = answer.whole([TextDelta("Hi", "stop", 1, tokens)], prompt_tokens=3)["choices"]
    assert [t["token"] for t in choice["logprobs"]["content"]] == ["Hi"]
    assert choice["message"] == {"role": "assistant", "content": "Hi", "refusal": None}

    def refuse(text: str, reason: str | None) -> tuple[str, str | None, bool]:
        return "", "content_filter", True

    streamed = ChatAnswer("id", "m", 1, refuse, buffered=True, logprobs=True)
    assert streamed.opening()[0]["delta"] == {"role": "assistant", "content": ""}
    assert streamed.step([TextDelta("Hi", None, 1, tokens[:1])]) == []  # held for the filter
    (end,) = streamed.step([TextDelta("", "stop", 1, tokens[1:])])
    assert end["delta"] == {} and end["logprobs"] is None
    assert end["finish_reason"] == "content_filter"
