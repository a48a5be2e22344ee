/* The static gallery's search box: hides the cards of this page that do not match every word typed, and names
   the other pages with matches (from search-index.js, loaded when the box is first used: it holds every result's
   text, so pages open without it). The words travel to those pages in the URL's #q=. */
(function () {
  "use strict";
  const box = document.getElementById("vb-search");
  const status = document.getElementById("vb-search-status");
  const elsewhere = document.getElementById("vb-elsewhere");
  const cards = Array.from(document.querySelectorAll(".vb-card"));
  const current = Number(document.body.dataset.page);
  const pageName = (page) => (page === 1 ? "index.html" : "page-" + page + ".html");

  function apply() {
    const words = box.value.toLowerCase().split(/\s+/).filter(Boolean);
    const matches = (text) => words.every((word) => text.includes(word));
    let shown = 0;
    for (const c of cards) {
      const keep = matches(c.dataset.search || "");
      c.hidden = !keep;
      if (keep) shown += 1;
    }
    status.textContent = words.length ? shown + " of " + cards.length + " on this page match" : "";
    elsewhere.replaceChildren();
    if (words.length && window.VB_INDEX) {
      const counts = new Map();
      for (const [page, text] of window.VB_INDEX) {
        if (page !== current && matches(text)) counts.set(page, (counts.get(page) || 0) + 1);
      }
      if (counts.size) {
        elsewhere.append("Also on: ");
        for (const [page, count] of counts) {
          const link = document.createElement("a");
          link.href = pageName(page) + "#q=" + encodeURIComponent(box.value);
          link.textContent = "page " + page + " (" + count + ")";
          elsewhere.append(link, " ");
        }
      }
    }
    try {
      history.replaceState(null, "", words.length ? "#q=" + encodeURIComponent(box.value) : location.pathname);
    } catch (e) {
      /* some browsers refuse history changes on file:// pages; the filter works regardless */
    }
  }

  let index = null;
  function loadIndex() {
    if (index) return;
    index = document.createElement("script");
    index.src = "search-index.js";
    index.addEventListener("load", () => { if (box.value) apply(); });
    document.head.append(index);
  }

  box.addEventListener("focus", loadIndex);
  box.addEventListener("input", () => { loadIndex(); apply(); });
  if (location.hash.startsWith("#q=")) box.value = decodeURIComponent(location.hash.slice(3));
  if (box.value) { loadIndex(); apply(); }
})();
