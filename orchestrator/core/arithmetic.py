"""Arithmetic in a plain answer is computed, not guessed.

The core answers "what's 12 times 7?" the way it was trained to, with the equation — ``12 * 7 = 84.`` —
but a 135M-parameter language model writes the result digit by digit from what looks likely, and gets
products wrong ("12 * 7 = 88."). An assistant that states a wrong sum is worse than one that says
nothing, and the equation's operands and operator are exactly what the model is good at copying. So the
loop recomputes every equation of integers it finds in a plain answer (``checked_arithmetic``) and puts
the true result in place of a wrong one, recording the correction (``ChatResult.corrections``), as
``fusion`` does for answers that contradict their calls.

Only ``A op B = C`` with integers and one of ``+ - * × x / ÷`` is read: a rule that says exactly what it
touches. A division whose result is not an integer is written with up to 4 decimals.
"""

from __future__ import annotations

import re
from fractions import Fraction

_EQUATION = re.compile(
    r"(?<![\w.])(?P<a>-?\d{1,12})\s*(?P<op>[-+*×x/÷−])\s*(?P<b>-?\d{1,12})\s*=\s*(?P<c>-?\d{1,24}(?:\.\d+)?)(?![\w.]*\d)")


def _value(a: int, op: str, b: int) -> Fraction | None:
    if op == "+":
        return Fraction(a + b)
    if op in "-−":
        return Fraction(a - b)
    if op in "*×x":
        return Fraction(a * b)
    return Fraction(a, b) if b != 0 else None


def _written(v: Fraction) -> str:
    if v.denominator == 1:
        return str(v.numerator)
    return f"{float(v):.4f}".rstrip("0").rstrip(".")


def checked_arithmetic(answer: str) -> tuple[str, list[str]]:
    """``answer`` with each wrong integer equation's result replaced by the true one, and a correction
    per replacement ("12 * 7 = 88 is 84")."""
    corrections: list[str] = []

    def fix(m: re.Match[str]) -> str:
        v = _value(int(m["a"]), m["op"], int(m["b"]))
        if v is None:
            return m[0]
        written = m["c"]
        try:
            ok = Fraction(written) == v if "." not in written else abs(float(written) - float(v)) < 5e-5 * max(
                1.0, abs(float(v)))
        except ValueError:
            return m[0]
        if ok:
            return m[0]
        right = _written(v)
        corrections.append(f"{m['a']} {m['op']} {m['b']} = {written} is {right}")
        return m[0][: m.start("c") - m.start()] + right

    return _EQUATION.sub(fix, answer), corrections
