// Compile-time checks (npm test runs `tsc -p test/types`): template params are typed from the OpenAPI
// document, so a wrong name or type fails to compile. Each @ts-expect-error fails the build if the line
// below it ever compiles.
import { GpuBridge, type TemplateName } from "../../src/index.js";

const gb = new GpuBridge({ baseUrl: "http://127.0.0.1:1" });

export async function typed(): Promise<void> {
  await gb.submitTemplate("model_free_invert", { color: 255, width: 64 });
  await gb.runTemplate("flux_schnell_t2i", { prompt: "a red fox", seed: "random", steps: 4 });
  await gb.submitTemplate("sdxl_img2img", { image: { url: "https://example.com/a.png" }, denoise: 0.5 });
  // @ts-expect-error: color is an integer, not a string
  await gb.submitTemplate("model_free_invert", { color: "red" });
  // @ts-expect-error: no such parameter
  await gb.submitTemplate("model_free_invert", { colour: 1 });
  // @ts-expect-error: no such template
  await gb.submitTemplate("nope", {});
  // @ts-expect-error: sdxl_img2img requires its image
  await gb.submitTemplate("sdxl_img2img", { prompt: "x" });
  const name: TemplateName = "wan21_t2v";
  void name;
}
