// Traindeck: show training progress in the browser tab's title, so a background tab
// still tells how far the job is. Runs in the WebUI (which loads javascript/*.js)
// and in the standalone app (which runs it on page load).
(function () {
  if (window.traindeckTitleWatcher) return;
  const baseTitle = document.title;
  function statusText() {
    const box = document.querySelector("#traindeck-status textarea");
    return box ? box.value : "";
  }
  function update() {
    const text = statusText();
    const step = /step (\d+)\/(\d+)/.exec(text);
    if (text.startsWith("training") && step) {
      document.title = `[${step[1]}/${step[2]}] ${baseTitle}`;
    } else if (document.title !== baseTitle) {
      document.title = baseTitle;
    }
  }
  window.traindeckTitleWatcher = setInterval(update, 1000);
})();
