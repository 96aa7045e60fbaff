// The committed OpenAPI document and the types generated from it must match what the server serves today.
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { it } from "node:test";

import { HERE, python, REPO } from "./harness.mjs";

const PKG = join(HERE, "..");

it("openapi.json is the gateway's current document (regenerate: npm run openapi)", () => {
  const current = execFileSync(python(), ["-m", "gpubridge.server.openapi"], { cwd: REPO, encoding: "utf8" });
  const committed = readFileSync(join(PKG, "openapi.json"), "utf8");
  assert.deepEqual(JSON.parse(committed), JSON.parse(current));
});

it("src/schema.d.ts is generated from openapi.json (regenerate: npm run generate)", () => {
  const dir = mkdtempSync(join(tmpdir(), "gpubridge-types-"));
  try {
    const out = join(dir, "schema.d.ts");
    execFileSync(join(PKG, "node_modules", ".bin", "openapi-typescript"), ["openapi.json", "-o", out], { cwd: PKG, stdio: "ignore" });
    assert.equal(readFileSync(join(PKG, "src", "schema.d.ts"), "utf8"), readFileSync(out, "utf8"));
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

it("every operation declares the error envelope for its error statuses", () => {
  const doc = JSON.parse(readFileSync(join(PKG, "openapi.json"), "utf8"));
  let checked = 0;
  for (const [path, item] of Object.entries(doc.paths)) {
    for (const [method, op] of Object.entries(item)) {
      const errors = Object.entries(op.responses).filter(([status]) => Number(status) >= 400 && Number(status) !== 503);
      assert.ok(errors.length > 0, `${method} ${path} declares no error`);
      for (const [status, response] of errors) {
        const schema = response.content?.["application/json"]?.schema?.$ref;
        assert.equal(schema, "#/components/schemas/ErrorBody", `${method} ${path} ${status}`);
        checked++;
      }
    }
  }
  assert.ok(checked > 10);
});
