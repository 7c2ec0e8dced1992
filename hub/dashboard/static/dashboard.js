// Keeps the page current without a reload: every 2 s, ask the server for this page's <main>
// and swap it in when it changed. The server renders everything; this only fetches.
(function () {
  "use strict";
  const PERIOD_MS = 2000;
  const main = document.getElementById("main");
  let last = main.innerHTML;
  async function refresh() {
    try {
      const response = await fetch(location.pathname + "?part=main", {
        credentials: "same-origin",
        cache: "no-store",
      });
      if (response.status === 401) {
        location.reload(); // the token was rotated: show the login form
        return;
      }
      if (response.ok) {
        const html = await response.text();
        if (html !== last) {
          main.innerHTML = html;
          last = html;
          const count = main.querySelector(".attention-total");
          const badge = document.getElementById("attention-count");
          if (count && badge) badge.textContent = count.dataset.count;
        }
        document.body.dataset.refreshed = String(Date.now());
      }
    } catch (error) {
      // the hub restarts or the network blinks: keep the last view and try again
    }
    setTimeout(refresh, PERIOD_MS);
  }
  setTimeout(refresh, PERIOD_MS);
})();
