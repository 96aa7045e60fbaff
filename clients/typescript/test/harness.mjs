// Starts what the end-to-end tests need: the ComfyUI double and a gateway in front of it, as real
// processes on 127.0.0.1, and stops them afterwards. GPUBRIDGE_PYTHON names the Python that has gpubridge
// installed (default: the repository's .venv, else python3).
import { spawn } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

export const HERE = dirname(fileURLToPath(import.meta.url));
export const REPO = resolve(HERE, "../../..");
export const TOKEN = "ts-client-test-token";
/** The RunPod endpoint id the gateway serves under /v2/ (its RunPod-compatible facade). */
export const RUNPOD_ENDPOINT = "ryla-comfy";

export function python() {
  if (process.env.GPUBRIDGE_PYTHON) return process.env.GPUBRIDGE_PYTHON;
  const venv = join(REPO, ".venv", "bin", "python");
  return existsSync(venv) ? venv : "python3";
}

export function workflow(name = "model_free_invert") {
  return JSON.parse(readFileSync(join(REPO, "workflows", `${name}.json`), "utf8"));
}

export async function freePort() {
  return new Promise((resolvePort, reject) => {
    const server = createServer();
    server.unref();
    server.on("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const { port } = server.address();
      server.close(() => resolvePort(port));
    });
  });
}

function start(args, env, { ready, label }) {
  const child = spawn(python(), args, { cwd: REPO, env: { ...process.env, ...env }, stdio: ["ignore", "pipe", "pipe"] });
  let log = "";
  child.stdout.on("data", (d) => (log += d));
  child.stderr.on("data", (d) => (log += d));
  const exited = new Promise((res) => child.on("exit", (code) => res(code)));
  return { child, exited, log: () => log, label, ready };
}

async function waitUntil(check, proc, what, ms = 60000) {
  const end = Date.now() + ms;
  let exitCode = null;
  proc.exited.then((c) => (exitCode = c));
  while (Date.now() < end) {
    if (exitCode !== null) throw new Error(`${proc.label} exited (${exitCode}) before ${what}:\n${proc.log()}`);
    if (await check().catch(() => false)) return;
    await new Promise((r) => setTimeout(r, 100)); // polling a condition with a deadline
  }
  throw new Error(`${proc.label}: no ${what} within ${ms} ms:\n${proc.log()}`);
}

async function stop(proc) {
  if (proc.child.exitCode !== null) return;
  proc.child.kill("SIGTERM");
  const timer = setTimeout(() => proc.child.kill("SIGKILL"), 10000);
  await proc.exited;
  clearTimeout(timer);
}

/** The ComfyUI double and a gateway over it; `env` adds to the gateway's environment. */
export async function startStack(env = {}) {
  const comfyPort = await freePort();
  const comfy = start(["-m", "gpubridge.testing.comfy", "--port", String(comfyPort), "--no-cache"], {}, { label: "ComfyUI double" });
  const comfyUrl = `http://127.0.0.1:${comfyPort}`;
  await waitUntil(async () => (await fetch(`${comfyUrl}/system_stats`)).ok, comfy, "answer");
  const port = await freePort();
  const dataDir = mkdtempSync(join(tmpdir(), "gpubridge-ts-"));
  const gateway = start(
    process.env.GPUBRIDGE_TS_SERVER === "modal_app" ? ["-m", "modal_app.serve", "--comfy-url", comfyUrl, "--port", String(port), "--token", TOKEN] : ["-m", "gpubridge.cli", "serve", "--host", "127.0.0.1", "--port", String(port), "--data-dir", dataDir, "--runpod-endpoint", RUNPOD_ENDPOINT],
    {
      GPUBRIDGE_PROVIDER: "local",
      GPUBRIDGE_COMFY_URL: comfyUrl,
      GPUBRIDGE_API_TOKEN: TOKEN,
      GPUBRIDGE_FALLBACKS: "",
      ...env,
    },
    { label: "gpubridge serve" },
  );
  const baseUrl = `http://127.0.0.1:${port}`;
  await waitUntil(
    async () => (await fetch(`${baseUrl}/v1/health`, { headers: { Authorization: `Bearer ${TOKEN}` } })).status < 500,
    gateway,
    "health answer",
  );
  return {
    baseUrl,
    comfyUrl,
    token: TOKEN,
    /** Set the double's faults (POST /gpubridge/faults), e.g. `{ hold: ["ImageInvert"] }`. */
    async faults(changes) {
      const response = await fetch(`${comfyUrl}/gpubridge/faults`, {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify(changes),
      });
      if (!response.ok) throw new Error(`faults: ${response.status} ${await response.text()}`);
    },
    async close() {
      await stop(gateway);
      await stop(comfy);
      rmSync(dataDir, { recursive: true, force: true });
    },
    logs: () => ({ gateway: gateway.log(), comfy: comfy.log() }),
  };
}
