"""Error cases as data: each test module keeps a table ``{name: (error type, message regex, call)}``
and one parametrized test over it, so that a failing case names itself."""

import pytest


def expect(cases: dict, case: str) -> None:
  """Calls ``cases[case]``'s function and expects its error type and message."""
  error, message, call = cases[case]
  with pytest.raises(error, match=message):
    call()
