import { Webhook, WebhookVerificationError } from "standardwebhooks";

import type { components } from "./schema.js";

export { WebhookVerificationError };

/** What the gateway POSTs to a job's webhook: the job's envelope once it reached a terminal state. */
export type WebhookPayload = components["schemas"]["JobEnvelope"];

type HeaderBag = Headers | Record<string, string | string[] | undefined>;

/**
 * Verify a webhook the gateway sent (Standard Webhooks: `webhook-id`, `webhook-timestamp`,
 * `webhook-signature`) and return its parsed payload. `body` must be the raw request body, exactly as
 * received; `secret` is the gateway's webhook secret (`whsec_...` or its base64 part). Throws
 * `WebhookVerificationError` for a bad signature or a timestamp outside the tolerance (replays).
 * Receivers should dedupe on `webhook-id`: retries of one delivery carry the same id.
 */
export function verifyWebhook(headers: HeaderBag, body: string | Buffer, secret: string): WebhookPayload {
  const flat: Record<string, string> = {};
  if (headers instanceof Headers) {
    headers.forEach((value, key) => {
      flat[key.toLowerCase()] = value;
    });
  } else {
    for (const [key, value] of Object.entries(headers)) {
      if (value !== undefined) flat[key.toLowerCase()] = Array.isArray(value) ? value.join(", ") : value;
    }
  }
  const payload = typeof body === "string" ? body : body.toString("utf8");
  return new Webhook(secret).verify(payload, flat) as WebhookPayload;
}
