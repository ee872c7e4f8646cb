"""Mission briefs with hidden checks, for bench/briefs.py.

Each brief is typed as a user would; the checks are never shown to a model.
After the brief's own call has grown and run the method, every check calls
the installed method again with other arguments. ``expect`` is a value (equal
as plain data; floats to 1e-6) or a function of (result, earlier results),
where earlier results start with the brief's own call.
"""

from __future__ import annotations

import datetime
import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

Expect = Any  # a value, or Callable[[result, history], bool]


@dataclass(frozen=True)
class Check:
    args: tuple[Any, ...] = ()
    expect: Expect = None


@dataclass(frozen=True)
class Brief:
    text: str
    checks: tuple[Check, ...]
    first: Callable[[Any], bool] | None = None  # a check of the brief's own call
    tags: tuple[str, ...] = field(default_factory=tuple)


def same(expect: Any, got: Any) -> bool:
    if isinstance(expect, float) or isinstance(got, float):
        try:
            return math.isclose(float(expect), float(got), rel_tol=1e-6, abs_tol=1e-9)
        except (TypeError, ValueError):
            return False
    if isinstance(expect, (list, tuple)) and isinstance(got, (list, tuple)):
        return len(expect) == len(got) and all(same(a, b) for a, b in zip(expect, got, strict=True))
    if isinstance(expect, bool) or isinstance(got, bool):
        return type(expect) is type(got) and expect == got
    return bool(expect == got)


def passes(check: Check, result: Any, history: list[Any]) -> bool:
    if callable(check.expect):
        try:
            return bool(check.expect(result, history))
        except Exception:  # a result of the wrong shape fails the check
            return False
    return same(check.expect, result)


def C(*args: Any, expect: Expect) -> Check:  # noqa: N802 - reads as a table
    return Check(tuple(args), expect)


def _today(result: Any, history: list[Any]) -> bool:
    return isinstance(result, str) and datetime.date.today().isoformat() in result


def _clock(result: Any, history: list[Any]) -> bool:
    return isinstance(result, str) and ":" in result and any(ch.isdigit() for ch in result)


def _next_count(step: int) -> Callable[[Any, list[Any]], bool]:
    def check(result: Any, history: list[Any]) -> bool:
        return isinstance(result, int) and result == history[-1] + step

    return check


def _grows_by(step: int) -> Callable[[Any, list[Any]], bool]:
    def check(result: Any, history: list[Any]) -> bool:
        return isinstance(result, (int, float)) and same(history[-1] + step, result)

    return check


def _in_range(low: int, high: int) -> Callable[[Any, list[Any]], bool]:
    return lambda result, history: isinstance(result, int) and low <= result <= high


BRIEFS: tuple[Brief, ...] = (
    Brief("create a method that returns the factorial of a number and call it with 5",
          (C(0, expect=1), C(6, expect=720), C(10, expect=3628800)), lambda r: r == 120),
    Brief("I need a method that adds two numbers; call it with 3 and 4",
          (C(10, 5, expect=15), C(-1, 1, expect=0), C(2.5, 0.5, expect=3.0)), lambda r: r == 7),
    Brief("make genesis able to reverse a string, call it with 'hello'",
          (C("abc", expect="cba"), C("", expect="")), lambda r: r == "olleh"),
    Brief("create a method to report the current system time",
          (C(expect=_clock),), lambda r: isinstance(r, str)),
    Brief("write a method that counts the vowels in a text, call it with 'banana'",
          (C("education", expect=5), C("xyz", expect=0), C("AEIOU", expect=5)), lambda r: r == 3),
    Brief("create a method that tells whether a number is prime; call it with 7",
          (C(1, expect=False), C(2, expect=True), C(9, expect=False), C(97, expect=True)),
          lambda r: r is True),
    Brief("a method that returns the n-th Fibonacci number (fib(0) is 0, fib(1) is 1), "
          "call it with 10",
          (C(0, expect=0), C(1, expect=1), C(20, expect=6765)), lambda r: r == 55),
    Brief("create a method that converts degrees celsius to fahrenheit and call it with 100",
          (C(0, expect=32), C(-40, expect=-40), C(37, expect=98.6)), lambda r: r == 212),
    Brief("create a method that counts how often it has been called and returns the count",
          (C(expect=_next_count(1)), C(expect=_next_count(1))),
          lambda r: isinstance(r, int), ("state",)),
    Brief("create a method called add_note that stores a text in a list of notes kept in the "
          "object and returns how many notes there are; call it with 'buy milk'",
          (C("call Bruce", expect=_next_count(1)), C("feed the bats", expect=_next_count(1))),
          lambda r: isinstance(r, int), ("state",)),
    Brief("create a method that returns the largest number in a list; call it with [3, 9, 2]",
          (C([1, 5, 3], expect=5), C([-2, -7], expect=-2)), lambda r: r == 9),
    Brief("create a method that checks if a word is a palindrome, call it with 'racecar'",
          (C("abba", expect=True), C("abc", expect=False)), lambda r: r is True),
    Brief("create a method that sums the digits of an integer; call it with 1234",
          (C(999, expect=27), C(0, expect=0), C(5, expect=5)), lambda r: r == 10),
    Brief("write a method that returns the number of words in a sentence, "
          "call it with 'the quick brown fox'",
          (C("one", expect=1), C("a b  c", expect=3)), lambda r: r == 4),
    Brief("create a method that computes the average of a list of numbers, "
          "call it with [1, 2, 3, 4]",
          (C([2, 4], expect=3), C([5], expect=5), C([1, 2], expect=1.5)), lambda r: r == 2.5),
    Brief("create a method that converts a string to title case; call it with 'hello world'",
          (C("bat os rules", expect="Bat Os Rules"),), lambda r: r == "Hello World"),
    Brief("create a method that returns the greatest common divisor of two numbers, "
          "call it with 12 and 18",
          (C(7, 5, expect=1), C(100, 75, expect=25)), lambda r: r == 6),
    Brief("create a method that removes duplicates from a list while keeping the order; "
          "call it with [1, 2, 2, 3, 1]",
          (C([3, 3, 1], expect=[3, 1]), C([], expect=[])), lambda r: r == [1, 2, 3]),
    Brief("create a method that returns a dictionary with how often each word occurs in a text; "
          "call it with 'a b a'",
          (C("x y x x", expect={"x": 3, "y": 1}),), lambda r: r == {"a": 2, "b": 1}),
    Brief("create a method that returns the number of days between two dates written as "
          "YYYY-MM-DD; call it with '2024-01-01' and '2024-03-01'",
          (C("2023-01-01", "2023-12-31", expect=364),), lambda r: r == 60),
    Brief("create a method that tells if a year is a leap year, call it with 2024",
          (C(1900, expect=False), C(2000, expect=True), C(2023, expect=False)), lambda r: r is True),
    Brief("create a method that converts a number to roman numerals; call it with 1994",
          (C(4, expect="IV"), C(2024, expect="MMXXIV")), lambda r: r == "MCMXCIV"),
    Brief("create a method that returns the list of the squares of the numbers from 1 to n; "
          "call it with 5",
          (C(3, expect=[1, 4, 9]), C(1, expect=[1])), lambda r: r == [1, 4, 9, 16, 25]),
    Brief("create a method that counts the uppercase letters in a string, "
          "call it with 'Hello World'",
          (C("ABCdef", expect=3), C("none", expect=0)), lambda r: r == 2),
    Brief("create a method that greets a person by name, like 'Hello, Bruce!', "
          "call it with 'Bruce'",
          (C("Alfred", expect="Hello, Alfred!"),), lambda r: r == "Hello, Bruce!"),
    Brief("create a method that keeps a running total in the object: each call adds a number "
          "to the total and returns the new total; call it with 5",
          (C(3, expect=_grows_by(3)), C(10, expect=_grows_by(10))),
          lambda r: r == 5, ("state",)),
    Brief("create a method that returns the median of a list of numbers; call it with [3, 1, 2]",
          (C([4, 1, 3, 2], expect=2.5), C([7], expect=7)), lambda r: r == 2),
    Brief("create a method that checks whether two words are anagrams of each other, "
          "call it with 'listen' and 'silent'",
          (C("abc", "abd", expect=False), C("evil", "vile", expect=True)), lambda r: r is True),
    Brief("create a method that converts a binary string to an integer; call it with '1010'",
          (C("1111", expect=15), C("0", expect=0)), lambda r: r == 10),
    Brief("create a method that flattens a list of lists into one list; "
          "call it with [[1, 2], [3], [4, 5]]",
          (C([[1], [2, 3]], expect=[1, 2, 3]), C([], expect=[])), lambda r: r == [1, 2, 3, 4, 5]),
    Brief("create a method that returns today's date as YYYY-MM-DD",
          (C(expect=_today),), lambda r: isinstance(r, str)),
    Brief("create a method that returns a random integer between two bounds, inclusive; "
          "call it with 1 and 6",
          (C(3, 3, expect=3), C(1, 2, expect=_in_range(1, 2))), lambda r: 1 <= r <= 6),
    Brief("create a method that stores a key and a value in a dictionary kept in the object "
          "and returns the number of keys stored; call it with 'a' and 1",
          (C("b", 2, expect=_next_count(1)), C("a", 5, expect=lambda r, h: r == h[-1])),
          lambda r: isinstance(r, int), ("state",)),
    Brief("create a method that returns the sha256 hex digest of a text; call it with 'abc'",
          (C("", expect=hashlib.sha256(b"").hexdigest()),),
          lambda r: r == hashlib.sha256(b"abc").hexdigest()),
    Brief("create a method that sorts a list of words by their length, shortest first; "
          "call it with ['ccc', 'a', 'bb']",
          (C(["aa", "b"], expect=["b", "aa"]),), lambda r: r == ["a", "bb", "ccc"]),
    Brief("create a method that returns the n-th prime number (the first prime is 2); "
          "call it with 5",
          (C(1, expect=2), C(10, expect=29)), lambda r: r == 11),
)  # fmt: skip
