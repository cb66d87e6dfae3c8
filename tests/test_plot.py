"""``refattn plot``: each kind of figure, checked on the data it draws."""

import numpy as np
import pytest

from refattn import cli
from refattn.conformance import export
from refattn.conformance.plot import case_picture, draw, mechanism_picture
from refattn.conformance.suite import load_suite

pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    out = tmp_path_factory.mktemp("suite")
    export.export(out, mechanisms=["dense"], progress=False)
    return load_suite(out, "dense")


def case(suite, case_id):
    return next(c for c in suite.cases if c.id == case_id)


def image_and_lines(figure):
    axes = figure.axes[0]
    return axes.images[0], {line.get_label(): line for line in axes.get_lines()}


def test_a_window_across_unequal_lengths_shows_its_edges_and_no_weight_outside(dense, tmp_path):
    chosen = case(dense, "dense/sliding_window_cross_bottom_right")
    picture = case_picture(chosen)
    nq, nk = picture.weights.shape
    left, right = chosen.params["window"]
    offset = nk - nq  # bottom-right alignment
    i, j = np.indices((nq, nk))
    inside = (j >= i + offset - left) & (j <= i + offset + right)
    assert np.all(picture.unattended == ~inside)
    np.testing.assert_allclose(picture.weights.sum(axis=1), 1.0)
    assert picture.bounds == [("window, left edge", offset - left), ("window, right edge", offset + right)]
    figure = draw(picture, tmp_path / "window.png")
    image, lines = image_and_lines(figure)
    drawn = image.get_array()
    assert np.array_equal(drawn.mask, picture.unattended) and np.allclose(drawn.data, picture.weights)
    np.testing.assert_array_equal(lines["window, left edge"].get_xdata(), np.clip(np.arange(nq) + offset - left, -0.5, nk - 0.5))
    assert (tmp_path / "window.png").stat().st_size > 0


def test_causal_top_left_draws_the_diagonal_bound(dense):
    picture = case_picture(case(dense, "dense/causal_top_left_short_queries"))
    assert picture.bounds == [("causal bound", 0)]
    assert picture.unattended[0, 1:].all() and not picture.unattended[0, 0]


def test_lsh_buckets_are_bands_and_weights_stay_inside_shared_buckets():
    picture = mechanism_picture("lsh", n=32, params={"num_buckets": 4, "num_hashes": 1})
    assert picture.band_label == "bucket (round 0)"
    k = picture.key_bands
    assert np.array_equal(picture.query_bands, k) and set(k) <= set(range(4)) and len(set(k)) > 1
    assert picture.unattended.any() and (~picture.unattended).any()
    figure = draw(picture)
    strips = [image for axes in figure.axes for image in axes.images if image.get_label().startswith("key ")]
    assert np.array_equal(strips[0].get_array().data[0], k)


def test_routing_clusters_are_bands_and_unrouted_queries_get_no_weight():
    picture = mechanism_picture("routing", n=32, params={"num_clusters": 4, "cluster_size": 4})
    assert picture.band_label == "cluster"
    unrouted = picture.query_bands < 0
    assert unrouted.any() and picture.unattended[unrouted].all()
    figure = draw(picture)
    strips = {image.get_label(): image for axes in figure.axes for image in axes.images}
    assert np.array_equal(strips["query cluster"].get_array().mask[:, 0], unrouted)


def test_plot_command_writes_the_file_and_refuses_bad_input(dense, tmp_path, capsys):
    out = tmp_path / "case.png"
    assert cli.main(["plot", "dense/causal", "--suite", str(dense.folder), "-o", str(out)]) == 0 and out.stat().st_size
    assert cli.main(["plot", "--mechanism", "dense", "--n", "12", "--param", "causal=true", "-o", str(out)]) == 0
    assert cli.main(["plot", "dense/nope", "--suite", str(dense.folder), "-o", str(out)]) == 2
    assert "no case 'dense/nope'" in capsys.readouterr().err
