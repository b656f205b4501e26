"""The typed backfill order of the offline evaluation: parsed from the command line's form, written back as it."""

import pytest

from raybackfill.eval.offline import OfflineConfig, Order
from raybackfill.types import Method, Metric, Policy


@pytest.mark.parametrize("text", ["random", "uncertainty", "entropy", "least_confidence", "id", "column:score"])
def test_an_order_reads_and_writes_the_command_line_form(text):
    order = Order.parse(text)
    assert str(order) == text and Order.parse(order) is order


def test_an_order_is_a_policy_or_a_score_column():
    assert Order.parse("entropy") == Order(Policy.ENTROPY) and Order.parse("entropy").column is None
    assert Order.parse("column:oracle_loss") == Order(column="oracle_loss")
    assert Order(policy="random").policy is Policy.RANDOM
    with pytest.raises(ValueError, match="unknown order 'fancy'; use one of uncertainty, .* or column:NAME"):
        Order.parse("fancy")
    with pytest.raises(ValueError, match="needs a name"):
        Order.parse("column:")
    with pytest.raises(ValueError, match="not both or neither"):
        Order(Policy.RANDOM, "score")
    with pytest.raises(ValueError, match="not both or neither"):
        Order()


def test_the_offline_config_holds_typed_values():
    config = OfflineConfig("fct", orders=("random", "column:score"), metric="l2")
    assert config.method is Method.FCT and config.metric is Metric.L2
    assert config.orders == (Order(Policy.RANDOM), Order(column="score"))
    with pytest.raises(ValueError, match="orders repeat"):
        OfflineConfig("fct", orders=("random", Order(Policy.RANDOM)))
    with pytest.raises(ValueError, match="unknown method"):
        OfflineConfig("fancy")
