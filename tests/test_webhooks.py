"""Webhook signing (checked by the official openai client) and where deliveries may go."""

import json

import openai
import pytest

from loraplex.webhooks import WebhookError, check_destination, check_url, new_secret, sign


def test_a_signature_is_what_the_openai_client_verifies():
    secret, body = new_secret(), json.dumps({"type": "fine_tuning.job.succeeded"})
    client = openai.OpenAI(api_key="unused", base_url="http://127.0.0.1:9")
    import time
    now = int(time.time())
    headers = {"webhook-id": "evt_1", "webhook-timestamp": str(now),
               "webhook-signature": sign(secret, "evt_1", now, body)}
    client.webhooks.verify_signature(body, headers, secret=secret)
    with pytest.raises(openai.InvalidWebhookSignatureError):
        client.webhooks.verify_signature(body + " ", headers, secret=secret)
    with pytest.raises(openai.InvalidWebhookSignatureError):
        client.webhooks.verify_signature(body, headers, secret=new_secret())


@pytest.mark.parametrize("url", [
    "http://example.com/hook",  # not https
    "ftp://example.com/hook",
    "https:///no-host",
    "hook",
])
def test_urls_refused_before_any_network_use(url):
    with pytest.raises(WebhookError, match="url must be"):
        check_url(url, allow_private=False)


@pytest.mark.parametrize("url", [
    "https://127.0.0.1/hook", "https://localhost:8443/hook", "https://10.1.2.3/x",
    "https://169.254.169.254/latest/meta-data", "https://[::1]/hook", "https://192.168.0.1/",
])
def test_private_and_loopback_destinations_are_refused(url):
    with pytest.raises(WebhookError, match="non-public address"):
        check_destination(url, allow_private=False)
    check_destination(url.replace("https", "http"), allow_private=True)  # a closed network
