"""The mission brief translator: the rules, output validation, and a real GGUF model."""

from __future__ import annotations

import json
import os

import pytest

from batos_uvm.model_translator import (
    OUTPUT_SCHEMA,
    HybridTranslator,
    LlamaTranslator,
    TranslatorUnavailable,
)
from batos_uvm.translator import (
    NOT_UNDERSTOOD,
    RuleTranslator,
    Translation,
    parse_args,
    selector_from_words,
    transliterate,
    validate_command,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

rules = RuleTranslator()


def send_of(text):
    t = rules.translate(text)
    assert t.ok, t.message
    assert t.command.command == "send"
    return t.command.fields


@pytest.mark.parametrize(
    "text, selector",
    [
        ("create a method to report the current system time", "report_the_current_system_time"),
        ("Create a method to report the current system time.", "report_the_current_system_time"),
        ("write a method that returns the sum of two numbers", "returns_the_sum_of_two_numbers"),
        ("make a method greeting the user!", "greeting_the_user"),
        ("please write a new function to greet a user", "greet_a_user"),
        ("create a method called say_hello", "say_hello"),
        ("Could you make a method to count the user's words?", "count_the_users_words"),
    ],
)
def test_create_forms_become_a_send_to_genesis(text, selector):
    fields = send_of(text)
    assert fields == {"target": "genesis_obj", "selector": selector, "args": [], "kwargs": {},
                      "intent": " ".join(text.split())}  # fmt: skip


@pytest.mark.parametrize(
    "text, target, selector, args",
    [
        ("I need a method that adds two numbers; call it with 3 and 4",
         "genesis_obj", "adds_two_numbers", [3, 4]),
        ("create a method that returns the factorial of a number and call it with 5",
         "genesis_obj", "returns_the_factorial_of_a_number", [5]),
        ("make genesis able to reverse a string, call it with 'hello'",
         "genesis_obj", "reverse_a_string", ["hello"]),
        ("teach genesis to greet a person (try it with \"Bruce Wayne\")",
         "genesis_obj", "greet_a_person", ["Bruce Wayne"]),
        ("create a method called add_note that stores a text; call it with 'buy milk'",
         "genesis_obj", "add_note", ["buy milk"]),
        ("could you write a function which can sort words, then call it with ['b', 'a']",
         "genesis_obj", "sort_words", [["b", "a"]]),
        ("create a method that counts the days between two dates and call it with "
         "'2024-01-01' and '2024-03-01'",
         "genesis_obj", "counts_the_days_between_two_dates", ["2024-01-01", "2024-03-01"]),
        ("make catalog_obj able to count entries", "catalog_obj", "count_entries", []),
        ("a method that returns the n-th Fibonacci number, call it with 10",
         "genesis_obj", "returns_the_n_th_fibonacci_number", [10]),
    ],
)  # fmt: skip
def test_free_forms_carry_the_call_and_the_words(text, target, selector, args):
    fields = send_of(text)
    assert (fields["target"], fields["selector"], fields["args"]) == (target, selector, args)
    assert fields["intent"] == text


def test_make_needs_an_object_it_knows():
    result = rules.translate("make coffee able to brew")
    assert not result.ok and "names no object" in result.message


@pytest.mark.parametrize(
    "text, selector",
    [
        ("create a method to grüße die Welt", "gruesse_die_welt"),
        ("create a method to sag Grüß Gott", "sag_gruess_gott"),
        ("create a method to count the café's crêpes", "count_the_cafes_crepes"),
        ("create a method for Ærø and Łódź", "aeroe_and_lodz"),
    ],
)
def test_non_ascii_letters_are_transliterated_in_selectors(text, selector):
    assert send_of(text)["selector"] == selector


def test_transliterate():
    assert transliterate("Grüße, Öl, Ärger, naïve, Straße") == "Gruesse, Oel, Aerger, naive, Strasse"


def test_selector_is_capped_at_whole_words_and_must_be_an_identifier():
    long = "create a method to " + " ".join(["compute"] * 30)
    sel = send_of(long)["selector"]
    assert len(sel) <= 64 and sel.startswith("compute_compute") and not sel.endswith("_")
    assert selector_from_words("123 apples") is None
    assert selector_from_words("!!!") is None
    assert selector_from_words("x" * 100) == "x" * 64
    assert not rules.translate("create a method to 42").ok
    assert not rules.translate("create a method").ok


@pytest.mark.parametrize(
    "text, target, selector, args",
    [
        ("call add on genesis_obj with 1, 2", "genesis_obj", "add", [1, 2]),
        ("call add on genesis_obj with 1 2", "genesis_obj", "add", [1, 2]),
        ('call greet on genesis_obj with "Bob Smith"', "genesis_obj", "greet", ["Bob Smith"]),
        ("call greet on genesis_obj with Bob", "genesis_obj", "greet", ["Bob"]),
        ('call total on 0x2a with [1, 2], {"k": true}', "0x2a", "total", [[1, 2], {"k": True}]),
        ("Call report on genesis_obj", "genesis_obj", "report", []),
        ("call report on genesis_obj.", "genesis_obj", "report", []),
    ],
)
def test_call_form(text, target, selector, args):
    fields = send_of(text)
    assert (fields["target"], fields["selector"], fields["args"]) == (target, selector, args)


def test_questions_go_to_the_catalog():
    fields = send_of("What is the living image?")
    assert fields["target"] == "knowledge_catalog_obj" and fields["selector"] == "search"
    assert fields["args"] == ["What is the living image?"]
    assert send_of("what are personas")["args"] == ["what are personas"]


@pytest.mark.parametrize(
    "text",
    [
        "hello there",
        "tell me a joke",
        "",
        "   ",
        "whatever is fine",
        "call me maybe",
        "call add-x on genesis_obj",
        "call add on no such thing",
    ],
)
def test_anything_else_is_not_understood(text):
    t = rules.translate(text)
    assert not t.ok and t.message
    if text.strip() in ("hello there", "tell me a joke", "whatever is fine", ""):
        assert t.message == NOT_UNDERSTOOD


def test_parse_args():
    assert parse_args('1, "a", true') == [1, "a", True]
    assert parse_args("x, y") == ["x", "y"]
    assert parse_args("'two words' 3") == ["two words", 3]
    assert parse_args("3 and 4") == [3, 4]
    assert parse_args("'rock and roll' and 2") == ["rock and roll", 2]
    assert parse_args("[3, 9, 2]") == [[3, 9, 2]]
    assert parse_args("['ccc', 'a'], True, None") == [["ccc", "a"], True, None]
    assert parse_args("{'a': 1} and 2.5") == [{"a": 1}, 2.5]


def test_validate_command():
    cmd = validate_command({"command": "cycles", "limit": 5})
    assert cmd.command == "cycles" and cmd.describe() == "cycles (last 5)"
    for bad in (
        {"command": "rm"},
        {"command": "send", "target": "genesis_obj"},
        {"command": "cycles", "limit": "5"},
        [1],
        {"command": "send", "target": "x", "selector": "os.system", "args": [], "kwargs": {}},
    ):
        with pytest.raises(ValueError):
            validate_command(bad)


class ScriptedLlama:
    """Stands in for llama_cpp.Llama where the test needs exact output; records loads."""

    loads = 0

    def __init__(self, outputs, **kwargs):
        type(self).loads += 1
        self.outputs = list(outputs)
        self.kwargs = kwargs
        self.prompts = []

    def create_completion(self, prompt, **kwargs):
        self.prompts.append(prompt)
        assert kwargs["grammar"] is not None
        return {"choices": [{"text": self.outputs.pop(0)}]}


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF")
    return str(path)


def test_llama_output_is_validated_and_invalid_output_rejected(model_file):
    pytest.importorskip("llama_cpp")
    outputs = [
        json.dumps(
            {
                "command": "send",
                "target": "genesis_obj",
                "selector": "greet_user",
                "args": ["Ann"],
                "kwargs": {},
            }
        ),
        '{"command": "send", "target": "genesis_obj"',
        json.dumps(
            {
                "command": "send",
                "target": "genesis_obj",
                "selector": "import",
                "args": [],
                "kwargs": {},
            }
        ),
        json.dumps({"command": "unclear"}),
        json.dumps({"command": "shutdown"}),
    ]
    ScriptedLlama.loads = 0
    t = LlamaTranslator(model_file, llama_factory=lambda **kw: ScriptedLlama(outputs, **kw))
    ok = t.translate("please greet Ann")
    assert ok.ok and ok.command.fields["selector"] == "greet_user" and ok.translator == "llama"
    assert ok.command.fields["intent"] == "please greet Ann"  # the words travel too
    assert "not valid JSON" in t.translate("x").message
    assert "invalid command" in t.translate("x").message
    assert t.translate("x").message == NOT_UNDERSTOOD
    assert "invalid command" in t.translate("x").message
    assert ScriptedLlama.loads == 1  # loaded once, not once per line
    assert "please greet Ann" in t._llm.prompts[0]


class Canned:
    name = "llama"

    def __init__(self, translation):
        self.translation = translation

    def translate(self, text):
        return self.translation


def test_the_hybrid_translator_falls_back_to_the_rules():
    good = validate_command({"command": "cycles", "limit": 3})
    assert HybridTranslator(Canned(Translation(good, "", "llama"))).translate("x").command == good
    unclear = HybridTranslator(Canned(Translation(None, NOT_UNDERSTOOD, "llama")))
    fallback = unclear.translate("create a method to greet")
    assert fallback.ok and fallback.translator == "rules"
    assert unclear.translate("tell me a joke").message == NOT_UNDERSTOOD
    broken = HybridTranslator(Canned(Translation(None, "the model's answer is not valid JSON", "llama")))
    assert broken.translate("tell me a joke").message == "the model's answer is not valid JSON"


def test_the_hybrid_translator_takes_the_models_name_and_the_rules_arguments():
    text = "I need a method that adds up two whole numbers; call it with 3 and 4"

    def model_says(**fields):
        command = validate_command({"command": "send", "kwargs": {}, **fields})
        return HybridTranslator(Canned(Translation(command, "", "llama"))).translate(text)

    short = model_says(target="genesis_obj", selector="add", args=[3])
    assert short.command.fields == {"target": "genesis_obj", "selector": "add", "args": [3, 4],
                                    "kwargs": {}, "intent": text}  # fmt: skip
    assert short.translator == "llama"
    for wrong in ({"target": "genesis_obj", "selector": "search", "args": [text]},
                  {"target": "knowledge_catalog_obj", "selector": "add", "args": []}):  # fmt: skip
        kept = model_says(**wrong)
        assert kept.command.fields["selector"] == "adds_up_two_whole_numbers"
        assert kept.translator == "rules"


def test_a_short_rules_name_needs_no_model_and_a_model_loads_only_when_needed(capsys):
    loads = []

    def load():
        loads.append(1)
        raise TranslatorUnavailable("cannot load m.gguf: broken")

    hybrid = HybridTranslator(load)
    quick = hybrid.translate("create a method to greet a user; call it with 'Ann'")
    assert quick.command.fields["selector"] == "greet_a_user" and not loads
    slow = hybrid.translate("I need a method that adds up two whole numbers")
    assert slow.ok and slow.translator == "rules" and loads == [1]
    assert "cannot load m.gguf" in hybrid.problem and "rules translate alone" in capsys.readouterr().err
    hybrid.translate("I need a method that adds up two whole numbers")
    assert loads == [1]  # tried once


def test_missing_model_says_how_to_configure(tmp_path):
    with pytest.raises(TranslatorUnavailable, match="LLAMA_MODEL_PATH"):
        LlamaTranslator(str(tmp_path / "none.gguf"))


def test_unloadable_model_file_is_a_clear_error(model_file):
    pytest.importorskip("llama_cpp")
    with pytest.raises(TranslatorUnavailable, match="cannot load"):
        LlamaTranslator(model_file)  # four bytes are not a model


@pytest.mark.model
@pytest.mark.slow
def test_real_gguf_model_loaded_once_and_output_checked(tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    from gguf_writer import write_gguf
    from tinymodel import build_tiny_llama

    gguf = write_gguf(build_tiny_llama(tmp_path / "hf", seed=0), tmp_path / "tiny.gguf")
    loads = []

    def factory(**kwargs):
        loads.append(kwargs)
        return llama_cpp.Llama(**kwargs)

    t = LlamaTranslator(str(gguf), llama_factory=factory, max_tokens=48)
    for text in ("create a method to report the time", "what is the image?", "hello"):
        result = t.translate(text)
        # a random tiny model writes grammar-shaped JSON; whatever it says is either a
        # command that passed the protocol's validation or a clear rejection
        if result.ok:
            validate_command({"command": result.command.command, **result.command.fields})
        else:
            assert result.message.startswith(("the model", NOT_UNDERSTOOD)), result.message
    assert len(loads) == 1


def test_output_schema_lists_only_translatable_commands():
    consts = {alt["properties"]["command"]["const"] for alt in OUTPUT_SCHEMA["oneOf"]}
    assert consts == {"send", "inspect", "cycles", "unclear"}


class Namer(Canned):
    def __init__(self, name):
        super().__init__(Translation(None, "never asked", "llama"))
        self.name_given, self.asked = name, []

    def name_for(self, text):
        self.asked.append(text)
        return self.name_given


def test_a_model_that_can_name_is_only_asked_for_a_name():
    text = "I need a method that adds up two whole numbers; call it with 3 and 4"
    namer = Namer("add")
    done = HybridTranslator(namer).translate(text)
    assert done.command.fields["selector"] == "add" and done.command.fields["args"] == [3, 4]
    assert namer.asked == [text]
    silent = HybridTranslator(Namer(None)).translate(text)
    assert silent.command.fields["selector"] == "adds_up_two_whole_numbers"


def test_the_llama_translator_names_with_a_short_prompt(model_file):
    pytest.importorskip("llama_cpp")

    class Naming(ScriptedLlama):
        def create_completion(self, prompt, **kwargs):
            self.prompts.append(prompt)
            return {"choices": [{"text": self.outputs.pop(0)}]}

    t = LlamaTranslator(model_file, llama_factory=lambda **kw: Naming([" square_root", " 2bad"], **kw))
    assert t.name_for("create a method that returns the square root of 16") == "square_root"
    assert t.name_for("anything") is None  # not an identifier
    assert len(t._llm.prompts[0]) < 400
