"""Stripe's form encoding and the parameter table's validation, as units."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, strategies as st

from stripe_standin._errors import StripeApiError
from stripe_standin._params import (
    decode_form,
    flatten,
    integer,
    lst,
    metadata,
    obj,
    string,
    validate,
)

_names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=8)
_values = st.text(alphabet="abcXYZ019 -.:", max_size=10)
_nested: st.SearchStrategy[dict[str, Any]] = st.recursive(
    st.dictionaries(_names, _values, min_size=1, max_size=4),
    lambda children: st.dictionaries(_names, children | _values, min_size=1, max_size=3),
    max_leaves=12,
)


class TestDecoding:
    """Bracket names to nested values and back."""

    @given(_nested)
    def test_round_trip(self, params: dict[str, Any]) -> None:
        """Flattening a nested hash and decoding the pairs gives the hash back."""
        assert decode_form(flatten(params).items()) == params

    def test_arrays(self) -> None:
        """``x[]`` appends and ``x[0][y]`` indexes."""
        decoded = decode_form(
            [
                ("expand[]", "a"),
                ("expand[]", "b"),
                ("items[1][price]", "p2"),
                ("items[0][price]", "p1"),
            ]
        )
        assert decoded == {
            "expand": ["a", "b"],
            "items": {"1": {"price": "p2"}, "0": {"price": "p1"}},
        }
        spec = {"items": lst(obj({"price": string(required=True)})), "expand": lst(string())}
        assert validate(spec, decoded)["items"] == [{"price": "p1"}, {"price": "p2"}]

    @pytest.mark.parametrize(
        "pairs",
        [[("a", "1"), ("a[b]", "2")], [("a[b]", "1"), ("a", "2")], [("a[]", "1"), ("a[b]", "2")]],
    )
    def test_conflicting_shapes(self, pairs: list[tuple[str, str]]) -> None:
        """A name used both as a value and as a hash (or array) is a 400."""
        with pytest.raises(StripeApiError) as caught:
            decode_form(pairs)
        assert caught.value.status == 400


class TestValidation:
    """The parameter table's rules."""

    def test_typed_values(self) -> None:
        """Integers become ints and metadata a dict of strings."""
        spec = {"n": integer(minimum=0), "metadata": metadata()}
        raw = decode_form([("n", "12"), ("metadata[a]", "b")])
        assert validate(spec, raw) == {"n": 12, "metadata": {"a": "b"}}

    def test_metadata_can_be_emptied(self) -> None:
        """``metadata=`` (empty) means no metadata, as Stripe reads it."""
        assert validate({"metadata": metadata()}, {"metadata": ""}) == {"metadata": {}}

    def test_long_metadata_key(self) -> None:
        """Metadata keys over 40 characters are refused."""
        with pytest.raises(StripeApiError):
            validate({"metadata": metadata()}, {"metadata": {"k" * 41: "v"}})

    def test_hash_where_a_string_is_expected(self) -> None:
        """A hash sent for a string parameter is refused, naming it."""
        with pytest.raises(StripeApiError) as caught:
            validate({"name": string()}, {"name": {"a": "b"}})
        assert caught.value.param == "name"

    def test_enum_message(self) -> None:
        """A bad enum value names the choices the way Stripe does."""
        with pytest.raises(StripeApiError) as caught:
            validate({"action": string(choices=("increment", "set"))}, {"action": "add"})
        assert caught.value.message == "Invalid action: must be one of increment or set"
