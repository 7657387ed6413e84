"""deploy/grafana/blenderchat.json stays in step with the metrics the bot exports."""

from __future__ import annotations

import json
import re

from conftest import REPO
from prometheus_client.parser import text_string_to_metric_families

from bot.metrics import Metrics


def test_every_series_the_dashboard_queries_is_one_the_bot_exports():
    metrics = Metrics()
    metrics.reply_latency.labels("web").observe(0.5)
    metrics.batch_size.observe(2)
    metrics.replies.labels("web", "ok").inc()  # labelled series appear once used
    metrics.safety_blocked.labels("input").inc()
    exported = {sample.name for family in text_string_to_metric_families(metrics.render().decode())
                for sample in family.samples}
    dashboard = json.loads((REPO / "deploy/grafana/blenderchat.json").read_text())
    queried = {name for panel in dashboard["panels"] for target in panel["targets"]
               for name in re.findall(r"blenderchat_\w+", target["expr"])}
    assert queried and queried <= exported, queried - exported
    titles = " ".join(panel["title"].lower() for panel in dashboard["panels"])
    for topic in ("replies", "latency", "batch", "queue", "safety", "ratings", "share of bad"):
        assert topic in titles, topic
    assert all(panel["datasource"]["uid"] == "${DS_PROMETHEUS}" for panel in dashboard["panels"])
