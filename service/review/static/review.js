// rlaif review page: keyboard + buttons -> POST /api/labels (JSON + CSRF header), then the next unanswered pair.
(function () {
  "use strict";
  var csrf = document.querySelector('meta[name="csrf-token"]').content;
  function post(url, payload) {
    return fetch(url, { method: "POST", credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf }, body: JSON.stringify(payload) });
  }
  var form = document.getElementById("annotator-form");
  if (form) {
    form.addEventListener("submit", function (event) {
      event.preventDefault();
      post("/api/annotator", { name: document.getElementById("annotator-input").value }).then(function (r) {
        if (r.ok) { window.location.reload(); } else { r.json().then(function (e) { alert(e.message); }); }
      });
    });
  }
  var root = document.getElementById("review");
  if (!root) { return; }
  var status = document.getElementById("status");
  var busy = false;
  function answerFor(choice) {
    var left = root.dataset.left;
    if (choice === "left") { return left; }
    if (choice === "right") { return left === "1" ? "2" : "1"; }
    return choice;
  }
  function send(choice) {
    if (busy) { return; }
    busy = true;
    status.className = "";
    status.textContent = "saving…";
    post("/api/labels", { item: root.dataset.item, answer: answerFor(choice),
      note: document.getElementById("note").value, shown_left: root.dataset.left })
      .then(function (r) {
        if (!r.ok) {
          return r.json().catch(function () { return { message: r.statusText }; }).then(function (e) {
            busy = false; status.className = "error"; status.textContent = "not saved: " + e.message;
          });
        }
        return r.json().then(function (label) {
          status.textContent = "saved";
          root.dataset.saved = String(label.id);
          window.location.assign(root.dataset.after);
        });
      })
      .catch(function (error) { busy = false; status.className = "error"; status.textContent = "not saved: " + error; });
  }
  Array.prototype.forEach.call(document.querySelectorAll("button[data-choice]"), function (button) {
    button.addEventListener("click", function () { send(button.dataset.choice); });
  });
  document.addEventListener("keydown", function (event) {
    var tag = event.target.tagName;
    if (tag === "TEXTAREA" || tag === "INPUT" || tag === "SELECT" || event.ctrlKey || event.metaKey || event.altKey) { return; }
    if (event.key === "1") { send("left"); }
    else if (event.key === "2") { send("right"); }
    else if (event.key === "3") { send("tie"); }
    else if (event.key === " ") { event.preventDefault(); send("skip"); }
    else if (event.key === "ArrowRight" && root.dataset.next) { window.location.assign(root.dataset.next); }
    else if (event.key === "ArrowLeft" && root.dataset.prev) { window.location.assign(root.dataset.prev); }
  });
})();
