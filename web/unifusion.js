// UniFusion's frontend extension: one default of the VERIFI Rewrite node.
//
// The rewrite's seed matters only when it samples (sample on). ComfyUI's frontend gives every seed
// a control that defaults to "randomize", and ComfyUI re-runs every node after one whose inputs
// changed: so with greedy decoding (the default), each Queue press re-ran LAP Encode, Sample,
// VAE Decode and Save Image for the same picture. A newly placed VERIFI Rewrite gets "fixed";
// a saved workflow keeps what it saved (its values are applied after the node is created).
import { app } from "../../scripts/app.js";

app.registerExtension({
  name: "UniFusion.VERIFIRewriteSeed",
  nodeCreated(node) {
    if (node.comfyClass !== "UniFusionVERIFIRewrite") return;
    const control = (node.widgets || []).find((w) => w.name === "control_after_generate");
    if (control) control.value = "fixed";
  },
});
