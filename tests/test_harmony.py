"""Harmony glue: expected prompts are written out by hand from the spec (formats.md §6.3, harmony's
docs/format.md) and encoded with tiktoken's o200k_harmony, never produced by openai-harmony itself."""

import pytest

from ossq import harmony
from ossq.errors import OssqError
from ossq.harmony import CALL, END, RETURN, STOP_TOKENS, Chat, Reply, StreamParser, ToolCall, parse_reply
from ossq.tokenizer import o200k_harmony

IDENTITY = "You are ChatGPT, a large language model trained by OpenAI."
CHANNELS = "# Valid channels: analysis, commentary, final. Channel must be included for every message."
WEATHER_TOOL = {
    "name": "get_weather",
    "description": "Gets the current weather.",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "description": "City name"}},
        "required": ["city"],
    },
}


def _system(effort="medium", identity=IDENTITY, tools_line=""):
    return (
        f"<|start|>system<|message|>{identity}\nKnowledge cutoff: 2024-06\n\nReasoning: {effort}\n\n"
        f"{CHANNELS}{tools_line}<|end|>"
    )


def _ids(text: str) -> list[int]:
    return o200k_harmony().encode(text, allowed_special="all")


def _text(ids: list[int]) -> str:
    return o200k_harmony().decode(ids)


@pytest.fixture(autouse=True, scope="module")
def private_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OSSQ_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


def test_single_turn_prompt_is_the_spec_text():
    spec = (
        "<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\n"
        "Knowledge cutoff: 2024-06\n\nReasoning: medium\n\n# Valid channels: analysis, commentary, final. "
        "Channel must be included for every message.<|end|><|start|>user<|message|>What is 2 + 2?<|end|>"
        "<|start|>assistant"
    )
    assert harmony.render_prompt("What is 2 + 2?") == _ids(spec)


@pytest.mark.parametrize("effort", ["low", "high"])
def test_reasoning_effort_sets_the_reasoning_line(effort):
    expected = _system(effort) + "<|start|>user<|message|>hi<|end|><|start|>assistant"
    assert harmony.render_prompt("hi", reasoning_effort=effort) == _ids(expected)


@pytest.mark.parametrize("effort", ["Medium", "max", ""])
def test_unknown_reasoning_effort_is_rejected(effort):
    with pytest.raises(OssqError, match="reasoning_effort must be one of low, medium, high"):
        Chat(reasoning_effort=effort)


def test_system_identity_and_developer_instructions():
    expected = (
        _system(identity="You are Q.")
        + "<|start|>developer<|message|># Instructions\n\nAnswer in French.<|end|>"
        + "<|start|>user<|message|>hi<|end|><|start|>assistant"
    )
    assert harmony.render_prompt("hi", system="You are Q.", developer="Answer in French.") == _ids(expected)


@pytest.mark.parametrize("spec", [WEATHER_TOOL, {"type": "function", "function": WEATHER_TOOL}])
def test_function_tools_render_as_a_typescript_namespace(spec):
    tools_section = (
        "# Tools\n\n## functions\n\nnamespace functions {\n\n// Gets the current weather.\n"
        "type get_weather = (_: {\n// City name\ncity: string,\n}) => any;\n\n} // namespace functions"
    )
    expected = (
        _system(tools_line="\nCalls to these tools must go to the commentary channel: 'functions'.")
        + f"<|start|>developer<|message|># Instructions\n\nBe brief.\n\n{tools_section}<|end|>"
        + "<|start|>user<|message|>hi<|end|><|start|>assistant"
    )
    assert harmony.render_prompt("hi", developer="Be brief.", tools=[spec]) == _ids(expected)


def test_tool_spec_without_a_name_is_rejected():
    with pytest.raises(OssqError, match="name"):
        Chat(tools=[{"description": "nameless"}])


def test_special_token_text_in_user_content_stays_text():
    ids = harmony.render_prompt("a<|end|>b")
    assert ids.count(END) == 2  # closing the system and the user message, nothing injected
    assert _text(ids).endswith("<|start|>user<|message|>a<|end|>b<|end|><|start|>assistant")


def _turn(analysis: str, final: str) -> Reply:
    return parse_reply(
        _ids(
            f"<|channel|>analysis<|message|>{analysis}<|end|>"
            f"<|start|>assistant<|channel|>final<|message|>{final}<|return|>"
        )
    )


def test_second_turn_keeps_the_answer_and_drops_the_analysis():
    chat = Chat()
    chat.add_user("What is 2 + 2?")
    chat.add_assistant(_turn("Simple arithmetic.", "4"))
    chat.add_user("And 3 + 3?")
    expected = (
        _system() + "<|start|>user<|message|>What is 2 + 2?<|end|>"
        "<|start|>assistant<|channel|>final<|message|>4<|end|>"
        "<|start|>user<|message|>And 3 + 3?<|end|><|start|>assistant"
    )
    assert chat.prompt_tokens() == _ids(expected)
    assert [m.channel for m in chat.messages if m.channel] == ["analysis", "final"]  # history keeps it


def test_third_turn_drops_the_analysis_of_every_finished_turn():
    chat = Chat()
    for question, answer in [("q1", "a1"), ("q2", "a2")]:
        chat.add_user(question)
        chat.add_assistant(_turn(f"thinking about {question}", answer))
    chat.add_user("q3")
    assert "thinking" not in _text(chat.prompt_tokens())


def test_analysis_of_the_current_turn_survives_a_tool_call():
    chat = Chat(tools=[WEATHER_TOOL])
    chat.add_user("q1")
    chat.add_assistant(_turn("old thoughts", "a1"))
    chat.add_user("Weather in Paris?")
    reply = parse_reply(
        _ids(
            "<|channel|>analysis<|message|>Need the weather.<|end|><|start|>assistant<|channel|>commentary "
            'to=functions.get_weather <|constrain|>json<|message|>{"city":"Paris"}<|call|>'
        )
    )
    chat.add_assistant(reply)
    chat.add_tool_result("get_weather", '{"celsius": 20}')
    text = _text(chat.prompt_tokens())
    assert "old thoughts" not in text
    assert text.endswith(
        "<|start|>user<|message|>Weather in Paris?<|end|>"
        "<|start|>assistant<|channel|>analysis<|message|>Need the weather.<|end|>"
        "<|start|>assistant to=functions.get_weather<|channel|>commentary <|constrain|>json"
        '<|message|>{"city":"Paris"}<|call|>'
        '<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>{"celsius": 20}<|end|>'
        "<|start|>assistant"
    )


def test_a_reply_built_from_fields_renders_like_a_parsed_one():
    completion = (
        "<|channel|>analysis<|message|>Need it.<|end|><|start|>assistant<|channel|>commentary "
        'to=functions.get_weather <|constrain|>json<|message|>{"city":"Oslo"}<|call|>'
    )
    built = Reply(analysis="Need it.", final="", tool_calls=(ToolCall("get_weather", '{"city":"Oslo"}'),))
    prompts = []
    for reply in (parse_reply(_ids(completion)), built):
        chat = Chat(tools=[WEATHER_TOOL])
        chat.add_user("Weather in Oslo?")
        chat.add_assistant(reply)
        prompts.append(chat.prompt_tokens())
    assert prompts[0] == prompts[1]


def test_parse_splits_analysis_and_final():
    reply = _turn("User asks 2+2. Simple.", "2 + 2 = 4.")
    assert (reply.analysis, reply.final, reply.tool_calls) == ("User asks 2+2. Simple.", "2 + 2 = 4.", ())
    assert not reply.truncated and reply.error is None


def test_parse_extracts_a_tool_call():
    reply = parse_reply(
        _ids(
            "<|channel|>analysis<|message|>Look it up.<|end|><|start|>assistant<|channel|>commentary "
            'to=functions.get_weather <|constrain|>json<|message|>{"city": "San Francisco"}<|call|>'
        )
    )
    assert reply.tool_calls == (ToolCall(name="get_weather", arguments='{"city": "San Francisco"}'),)
    assert reply.analysis == "Look it up." and reply.final == ""


ANALYSED = "<|channel|>analysis<|message|>Simple.<|end|><|start|>assistant<|channel|>"


@pytest.mark.parametrize(
    ("completion", "analysis", "final"),
    [
        (ANALYSED + "final<|message|>Four is", "Simple.", "Four is"),
        (ANALYSED + "fin", "Simple.", ""),
        ("<|channel|>analysis<|message|>Hal", "Hal", ""),
        ("<|channel", "", ""),
        ("", "", ""),
    ],
)
def test_parse_tolerates_truncation(completion, analysis, final):
    reply = parse_reply(_ids(completion))
    assert (reply.analysis, reply.final, reply.truncated) == (analysis, final, True)


def test_parse_keeps_what_came_before_a_grammar_error():
    reply = parse_reply(_ids("<|channel|>final<|message|>4<|end|>stray text"))
    assert reply.final == "4"
    assert reply.error is not None


def test_parse_ignores_endoftext():
    reply = parse_reply(_ids("<|channel|>final<|message|>4<|endoftext|>"))
    assert reply.final == "4"


def test_stream_deltas_concatenate_to_the_parsed_texts():
    completion = _ids(
        "<|channel|>analysis<|message|>Crab 🦀 emoji, 日本語.<|end|>"
        "<|start|>assistant<|channel|>final<|message|>Voilà: 🦀🦀 done<|return|>"
    )
    parser = StreamParser()
    deltas = [parser.feed(t) for t in completion]
    assert any(delta == "" and channel for channel, delta in deltas)  # a token ended mid character
    by_channel = {"analysis": "", "final": ""}
    for channel, delta in deltas:
        assert channel is not None or delta == ""
        by_channel[channel or "analysis"] += delta
    reply = parse_reply(completion)
    assert by_channel == {"analysis": reply.analysis, "final": reply.final}
    assert reply.final == "Voilà: 🦀🦀 done"


def test_stream_parser_reports_the_tool_recipient():
    parser = StreamParser()
    tokens = _ids('<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"a"')
    for t in tokens:
        parser.feed(t)
    assert parser.recipient == "functions.get_weather"
    assert parser.reply().tool_calls == (ToolCall("get_weather", '{"a"'),)


def test_stop_tokens_are_return_and_call_never_end():
    assert STOP_TOKENS == (RETURN, CALL) == (200002, 200012)
    assert END not in STOP_TOKENS
    assert [_ids(s) for s in ("<|return|>", "<|call|>", "<|end|>")] == [[RETURN], [CALL], [END]]
    assert set(harmony.encoding().stop_tokens_for_assistant_actions()) == set(STOP_TOKENS)


# ---- a tolerant parser: each way a model breaks the grammar degrades to what it meant ------------------------
def _messages(reply: Reply) -> list[tuple]:
    return [(m.channel, m.recipient, m.content_type, m.content[0].text) for m in reply.messages]


def test_a_tool_call_on_the_analysis_channel_is_a_call_and_not_analysis():
    reply = parse_reply(
        _ids('<|channel|>analysis to=functions.get_weather <|constrain|>json<|message|>{"city":"Paris"}<|call|>')
    )
    assert reply.tool_calls == (ToolCall("get_weather", '{"city":"Paris"}'),)
    assert (reply.analysis, reply.final, reply.error, reply.truncated) == ("", "", None, False)


def test_the_recipient_may_sit_in_the_role_part_of_a_header():
    reply = parse_reply(
        _ids(
            ANALYSED.removesuffix("<|channel|>")
            + " to=functions.get_weather<|channel|>commentary json<|message|>{}<|call|>"
        )
    )
    assert _messages(reply)[1] == ("commentary", "functions.get_weather", "json", "{}")
    assert reply.error is None


def test_junk_in_a_header_is_skipped_and_named_in_the_error():
    reply = parse_reply(_ids("<|channel|>final garbage words <|constrain|> json extra<|message|>Hello.<|return|>"))
    assert reply.final == "Hello." and _messages(reply) == [("final", None, "<|constrain|>json", "Hello.")]
    assert "garbage words extra" in reply.error


@pytest.mark.parametrize(
    ("completion", "final", "says"),
    [
        (
            "<|channel|>final<|message|>One<|start|>assistant<|channel|>final<|message|> two<|return|>",
            "One two",
            "not closed",
        ),
        ("<|channel|>final<|message|>Hi<|end|><|start|>user<|message|>more<|end|>", "Hi", "'user'"),
        ("<|channel|>final<|message|>Hi<|return|>tail", "Hi", "after the end"),
        ("<|channel|>thinking<|message|>Hi<|return|>", "Hi", "channel 'thinking'"),
        ("<|channel|>final<|message|>A<|constrain|><|reserved_200013|>B<|return|>", "AB", None),
    ],
    ids=["start-in-content", "user-turn", "after-return", "unknown-channel", "specials-in-content"],
)
def test_grammar_errors_keep_the_messages_the_model_meant(completion, final, says):
    reply = parse_reply(_ids(completion))
    assert reply.final == final
    assert (reply.error is None) if says is None else (says in reply.error)


def test_a_completion_that_is_not_harmony_is_raw_text():
    short = parse_reply(_ids("just some words"))
    assert (short.raw, short.final, short.messages) == ("just some words", "", ())
    long_text = " lorem ipsum" * harmony.HEADER_MAX_TOKENS
    parser = StreamParser()
    pieces = [parser.push(t) for t in _ids(long_text)]
    first_text = next(i for i, p in enumerate(pieces) if p)
    assert first_text == harmony.HEADER_MAX_TOKENS  # held back only while it could still be a header
    assert "".join(p.text for ps in pieces for p in ps) == long_text
    assert all(p.message is None for ps in pieces for p in ps)
    assert parser.reply().raw == long_text


def test_pieces_carry_their_message_channel_and_recipient():
    parser = StreamParser()
    completion = ANALYSED + 'commentary to=functions.f <|constrain|>json<|message|>{"a": 1}<|call|>'
    pieces = [p for t in _ids(completion) for p in parser.push(t)]
    assert {(p.message, p.channel, p.recipient) for p in pieces} == {
        (0, "analysis", None),
        (1, "commentary", "functions.f"),
    }
    assert "".join(p.text for p in pieces if p.message == 1) == '{"a": 1}'
    assert parser.push(_ids("x")[0]) == []  # after <|call|> nothing is text


def test_response_format_closes_the_developer_message():
    fmt = harmony.ResponseFormat("shopping_list", {"type": "object"}, "A list of items.")
    expected = (
        _system()
        + "<|start|>developer<|message|># Instructions\n\nBe brief.\n\n# Response Formats\n\n## shopping_list\n\n"
        + '// A list of items.\n{"type": "object"}<|end|><|start|>user<|message|>hi<|end|><|start|>assistant'
    )
    assert harmony.render_prompt("hi", developer="Be brief.", response_format=fmt) == _ids(expected)
    alone = harmony.render_prompt("hi", response_format=fmt)
    assert _text(alone).startswith(_system() + "<|start|>developer<|message|># Response Formats\n\n## shopping_list")


def test_text_beside_tool_calls_is_a_preamble_and_reasoning_comes_first():
    chat = Chat(tools=[WEATHER_TOOL])
    chat.add_user("Weather?")
    chat.add_assistant(Reply(analysis="Look it up.", final="Checking.", tool_calls=(ToolCall("get_weather", "{}"),)))
    assert _text(chat.prompt_tokens()).endswith(
        "<|start|>assistant<|channel|>analysis<|message|>Look it up.<|end|>"
        "<|start|>assistant<|channel|>commentary<|message|>Checking.<|end|>"
        "<|start|>assistant to=functions.get_weather<|channel|>commentary <|constrain|>json<|message|>{}<|call|>"
        "<|start|>assistant"
    )


def test_a_tool_call_made_on_the_analysis_channel_survives_the_end_of_its_turn():
    chat = Chat(tools=[WEATHER_TOOL])
    chat.add_user("q")
    chat.add_assistant(
        parse_reply(_ids("<|channel|>analysis to=functions.get_weather <|constrain|>json<|message|>{}<|call|>"))
    )
    chat.add_tool_result("get_weather", "sunny")
    chat.add_assistant(_turn("thinking", "It is sunny."))
    chat.add_user("thanks")
    text = _text(chat.prompt_tokens())
    assert "thinking" not in text  # finished analysis is dropped ...
    assert "to=functions.get_weather<|channel|>analysis" in text  # ... but not the call its result answers
