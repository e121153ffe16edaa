"""The Prometheus text format of the metrics endpoint."""

from extproc.metrics import Metrics


def test_counters_render_with_sorted_labels_and_a_type_line() -> None:
    m = Metrics()
    m.inc("spendgate_requests_total", outcome="complete", status="200")
    m.inc("spendgate_requests_total", outcome="complete", status="200")
    text = m.render()
    assert "# TYPE spendgate_requests_total counter" in text
    assert 'spendgate_requests_total{outcome="complete",status="200"} 2' in text


def test_collectors_are_read_at_scrape_time() -> None:
    m = Metrics()
    value = [1]
    m.collect(lambda: [("spendgate_keys_loaded", "gauge", {}, value[0])])
    value[0] = 7
    assert "spendgate_keys_loaded 7" in m.render()


def test_label_values_are_escaped() -> None:
    m = Metrics()
    m.inc("x_total", reason='a "quoted"\nvalue')
    assert 'x_total{reason="a \\"quoted\\"\\nvalue"} 1' in m.render()
