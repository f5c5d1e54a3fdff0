"""revival.errors.reject_unknown: the one message for unknown keys, options and arguments."""

import pytest

from revival.errors import UserError, reject_unknown


def test_reject_unknown_names_the_unknown_and_the_valid():
    reject_unknown({"a": 1}, ["a", "b"], "section")  # nothing unknown: no error
    with pytest.raises(ValueError, match=r"^section: unknown key\(s\) \['c', 'z'\]; valid keys: \['a', 'b'\]$"):
        reject_unknown({"z": 1, "a": 2, "c": 3}, ["a", "b"], "section")
    with pytest.raises(UserError, match=r"^x: unknown option\(s\) \['q'\]; valid options: \['p'\]$"):
        reject_unknown(["q"], ["p"], "x", noun="option", error=UserError)
