// End to end: the client against a real `gpubridge serve` over the ComfyUI double.
import assert from "node:assert/strict";
import { after, before, describe, it } from "node:test";

import {
  AuthError,
  GpuBridge,
  GpuBridgeError,
  JobCancelled,
  JobNotFound,
  JobTimeout,
  ParamInvalid,
  TemplateNotFound,
  WorkflowError,
  WorkflowFormatError,
} from "../dist/index.js";
import { RUNPOD_ENDPOINT, startStack, workflow } from "./harness.mjs";

let stack;
let gb;

before(async () => {
  stack = await startStack();
  gb = new GpuBridge({ baseUrl: stack.baseUrl, token: stack.token });
});

after(async () => {
  await stack?.close();
});

describe("run", () => {
  it("runs a workflow and returns its images", async () => {
    const seen = [];
    const result = await gb.run(workflow(), { onUpdate: (env) => seen.push(env.status.state) });
    assert.equal(result.state, "succeeded");
    const images = result.artifacts.filter((a) => a.kind === "image");
    assert.equal(images.length, 2); // the example's batch of two
    const png = Buffer.from(images[0].data, "base64");
    assert.deepEqual([...png.subarray(1, 4)], [...Buffer.from("PNG")]);
    assert.ok(seen.length >= 1);
  });

  it("sends inputs as bytes", async () => {
    const wf = {
      1: { class_type: "LoadImage", inputs: { image: "face.png" } },
      2: { class_type: "ImageInvert", inputs: { image: ["1", 0] } },
      3: { class_type: "SaveImage", inputs: { images: ["2", 0], filename_prefix: "ts" } },
    };
    const { readFileSync } = await import("node:fs");
    const { join } = await import("node:path");
    const { REPO } = await import("./harness.mjs");
    const png = readFileSync(join(REPO, "examples", "inputs", "input.png"));
    const result = await gb.run(wf, { inputs: { "face.png": new Uint8Array(png) } });
    assert.equal(result.artifacts.filter((a) => a.kind === "image").length, 1);
  });

  it("a resubmit with the same idempotency key returns the same job", async () => {
    const first = await gb.submit(workflow(), { idempotencyKey: "ts-key-1" });
    const again = await gb.submit(workflow(), { idempotencyKey: "ts-key-1" });
    assert.equal(again.job_id, first.job_id);
    const done = await gb.wait(first.job_id);
    assert.equal(done.status.state, "succeeded");
  });
});

describe("templates", () => {
  it("lists the server's templates with their parameter schemas", async () => {
    const templates = await gb.templates();
    const invert = templates.find((t) => t.name === "model_free_invert");
    assert.ok(invert, JSON.stringify(templates.map((t) => t.name)));
    assert.equal(invert.schema.properties.color.maximum, 16777215);
  });

  it("runs a template with typed params", async () => {
    const result = await gb.runTemplate("model_free_invert", { width: 16, height: 8 });
    assert.deepEqual(result.artifacts.map((a) => [a.width, a.height]), [[16, 8], [16, 8]]);
  });

  it("a bad parameter is a ParamInvalid naming it; an unknown template a TemplateNotFound", async () => {
    await assert.rejects(gb.submitTemplate("model_free_invert", { color: -1 }), (err) => {
      assert.ok(err instanceof ParamInvalid && err instanceof WorkflowError, `${err.name}: ${err.message}`);
      assert.equal(err.status, 422);
      assert.deepEqual(Object.keys(err.params), ["color"]);
      return true;
    });
    await assert.rejects(gb.submitTemplate("nope", {}), (err) => err instanceof TemplateNotFound && err.status === 422);
  });
});

describe("errors", () => {
  it("an invalid workflow fails before it runs, typed, naming the node", async () => {
    const wf = workflow();
    wf["2"].class_type = "NoSuchNode";
    await assert.rejects(gb.run(wf), (err) => {
      assert.ok(err instanceof WorkflowError, `${err.name}: ${err.message}`);
      assert.equal(err.status, 422);
      assert.equal(err.retryable, false);
      assert.match(err.message, /NoSuchNode/);
      return true;
    });
  });

  it("a UI-format export is a WorkflowFormatError", async () => {
    await assert.rejects(gb.submit({ nodes: [], links: [] }), (err) => err instanceof WorkflowFormatError && err.status === 422);
  });

  it("a bad token is an AuthError", async () => {
    const bad = new GpuBridge({ baseUrl: stack.baseUrl, token: "wrong" });
    await assert.rejects(bad.health(), (err) => err instanceof AuthError && err.status === 401 && !err.retryable);
  });

  it("an unknown job is JobNotFound", async () => {
    await assert.rejects(gb.status("job-does-not-exist"), (err) => err instanceof JobNotFound && err.status === 404);
  });
});

describe("cancel and timeouts", () => {
  it("cancels a running job", async () => {
    await stack.faults({ delays: { ImageInvert: 3 } }); // a slow node: an interrupt lands when it ends
    try {
      const env = await gb.submit(workflow());
      // Wait until the held node runs, then cancel.
      let current = env;
      while (current.status.state === "queued") current = await gb.status(env.job_id, { wait: 5, after: current.version });
      const cancelled = await gb.cancel(env.job_id);
      const final = cancelled.status.state === "cancelled" ? cancelled : await gb.wait(env.job_id);
      assert.equal(final.status.state, "cancelled");
      assert.throws(() => GpuBridge.resultOf(final), JobCancelled);
    } finally {
      await stack.faults({ delays: {} });
    }
  });

  it("a job past its deadline ends timed_out and run() throws JobTimeout", async () => {
    await stack.faults({ delays: { ImageInvert: 3 } }); // a slow node: an interrupt lands when it ends
    try {
      await assert.rejects(gb.run(workflow(), { timeout: 1 }), (err) => {
        assert.ok(err instanceof JobTimeout, `${err.name}: ${err.message}`);
        assert.equal(err.retryable, true);
        return true;
      });
    } finally {
      await stack.faults({ delays: {} });
    }
  });

  it("an aborted run cancels its job on the server", async () => {
    await stack.faults({ delays: { ImageInvert: 3 } }); // a slow node: an interrupt lands when it ends
    try {
      const controller = new AbortController();
      let jobId;
      const running = gb.run(workflow(), {
        signal: controller.signal,
        onUpdate: (env) => {
          jobId = env.job_id;
          if (env.status.state === "running") controller.abort(new Error("caller gave up"));
        },
      });
      await assert.rejects(running, (err) => err instanceof GpuBridgeError);
      const final = await gb.wait(jobId);
      assert.equal(final.status.state, "cancelled");
    } finally {
      await stack.faults({ delays: {} });
    }
  });
});

describe("capabilities", () => {
  it("reports the node classes the backend has", async () => {
    const info = await gb.capabilities();
    assert.ok(info && "SaveImage" in info && "ImageInvert" in info);
  });
});

describe("RunPod-shaped calls", () => {
  it("today's RunPod fetch call works with only the base URL and key changed", { skip: process.env.GPUBRIDGE_TS_SERVER === "modal_app" }, async () => {
    // Shaped exactly like the RunPod call the TypeScript API makes today.
    const base = `${stack.baseUrl}/v2`;
    const headers = { Authorization: `Bearer ${stack.token}`, "Content-Type": "application/json" };
    const png = Buffer.from("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8DwHwAFBQIAX8jx0gAAAABJRU5ErkJggg==", "base64");
    const res = await fetch(`${base}/${RUNPOD_ENDPOINT}/run`, {
      method: "POST",
      headers,
      body: JSON.stringify({ input: { workflow: workflow(), images: [{ name: "face.png", image: png.toString("base64") }] } }),
    });
    assert.equal(res.status, 200);
    const { id, status } = await res.json();
    assert.ok(id && ["IN_QUEUE", "IN_PROGRESS", "COMPLETED"].includes(status));
    let body;
    for (let i = 0; i < 600; i++) {
      body = await (await fetch(`${base}/${RUNPOD_ENDPOINT}/status/${id}`, { headers })).json();
      if (!["IN_QUEUE", "IN_PROGRESS"].includes(body.status)) break;
      await new Promise((r) => setTimeout(r, 100)); // RunPod callers poll /status; so does this one
    }
    assert.equal(body.status, "COMPLETED");
    assert.equal(body.output.images.length, 2);
    assert.equal(body.output.images[0].type, "base64");
    assert.deepEqual([...Buffer.from(body.output.images[0].data, "base64").subarray(0, 4)], [0x89, 0x50, 0x4e, 0x47]);
    assert.equal(typeof body.executionTime, "number");
  });
});
