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

// Traindeck: a value refused when a job is added is shown beside its field. The Train tab's
// handler opens the field's folded group and hands over {id, label, text} (or "" when the job
// was accepted); this marks the field, puts the text under it and scrolls to it.
(function () {
  if (window.traindeckFieldError) return;
  function clear() {
    document.querySelectorAll(".traindeck-field-error").forEach((el) => el.remove());
    document.querySelectorAll(".traindeck-invalid").forEach((el) => el.classList.remove("traindeck-invalid"));
  }
  function mark(error, triesLeft) {
    const block = document.getElementById(error.id);
    if (!block || block.offsetParent === null) {
      // the group opened by the same event may not have rendered its fields yet
      if (triesLeft > 0) setTimeout(() => mark(error, triesLeft - 1), 100);
      return;
    }
    block.classList.add("traindeck-invalid");
    const note = document.createElement("div");
    note.className = "traindeck-field-error";
    note.setAttribute("role", "alert");
    note.textContent = error.text;
    block.appendChild(note);
    block.scrollIntoView({ block: "center", behavior: "smooth" });
  }
  window.traindeckFieldError = function (payload) {
    clear();
    if (!payload) return;
    let error;
    try {
      error = JSON.parse(payload);
    } catch (exc) {
      console.error("traindeck: unreadable field error", payload, exc);
      return;
    }
    mark(error, 30);
  };
})();
