// The widget manager finds its own files (the fonts of its icons) through the name require.js gives
// it, @jupyter-widgets/html-manager/dist/...: map that name to the site's copy beside this script.
require.config({
  paths: { "@jupyter-widgets/html-manager/dist": new URL("html-manager", document.currentScript.src).href },
});
