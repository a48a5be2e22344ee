"""Property-based tests of `vlbatch serve`'s routes: generated query parameters on vlbatch's own pages (gallery,
thumbnails, charts) and on Datasette's table pages of the results database. Each request ends in a page or a 4xx,
never a 500, and within the hard per-example limit (see tests/fuzz_support.py for the profiles)."""

from __future__ import annotations

import asyncio
from urllib.parse import quote, urlencode

import pytest
from fuzz_support import examples, hard_limit
from hypothesis import given, settings
from hypothesis import strategies as st

from batch.config import load_config
from batch.service.web import app

# Datasette 0.65 leaves its facet coroutines unawaited on a refused request: its own warning, not a fault here
pytestmark = pytest.mark.filterwarnings("ignore:coroutine .* was never awaited:RuntimeWarning")

NAMES = {
    "/-/gallery": ["job", "tag", "since", "until", "q", "show", "page", "run", "_sort", "x"],
    "/-/thumbnail": ["link", "path", "size", "x"],
    "/-/charts": ["limit", "x"],
    "/vlbatch/results": ["_sort", "_sort_desc", "_size", "_next", "_facet", "_search", "id__gt", "_where", "_col"],
    "/vlbatch/results.json": ["_sort", "_size", "_next", "_shape", "_facet", "_col", "_nocol", "answer__contains"],
    "/vlbatch/failures.json": ["_size", "_shape"],
}
VALUES = st.one_of(
    st.text(max_size=30),
    st.from_regex(r"-?[0-9]{1,25}", fullmatch=True),
    st.sampled_from(["²", "٣", "1e9", "nan", "-1", "0", "answers", "failed", "id", "created_utc", "1,2", "%", "'"]),
)


@pytest.fixture(scope="module")
def site(results_env, tmp_path_factory):
    datasette = app.build(load_config(results_env.config_path), tmp_path_factory.mktemp("fuzz-cache"))
    loop = asyncio.new_event_loop()
    yield datasette, loop
    loop.close()
    datasette.vlbatch_state.thumbnails.close()


@st.composite
def requests(draw) -> str:
    route = draw(st.sampled_from(sorted(NAMES)))
    params = draw(st.lists(st.tuples(st.sampled_from(NAMES[route]), VALUES), max_size=4))
    return route + ("?" + urlencode(params, quote_via=quote) if params else "")


@settings(max_examples=examples(300))
@given(url=requests())
def test_no_parameter_makes_a_server_error(site, url: str) -> None:
    datasette, loop = site
    with hard_limit():
        response = loop.run_until_complete(datasette.client.get(url))
    assert response.status_code < 500, (url, response.status_code, response.text[:500])
