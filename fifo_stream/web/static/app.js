// The live page: plays the run's HLS playlist, shows progress from /events, sends prompts to /prompt.
// Everything users typed is shown with textContent, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);

function showStatus(s) {
  $("frames").textContent = `${s.frame} / ${s.total}`;
  $("bar").value = s.total ? s.frame / s.total : 0;
  $("fps").textContent = s.fps == null ? "-" : s.fps.toFixed(2);
  $("eta").textContent = s.eta_s == null ? "-" : `${Math.round(s.eta_s)} s`;
  $("prompt").textContent = s.prompt;
}

function showStoryboard(scenes) {
  const list = $("storyboard");
  list.replaceChildren();
  for (const scene of scenes) addScene(scene);
}

function addScene(scene) {
  const item = document.createElement("li");
  const transition = scene.transition ? ` (transition ${scene.transition})` : "";
  const renew = scene.anchor === "renew" ? " (new look)" : "";
  item.textContent = `frame ${scene.frame}: ${scene.prompt}${transition}${renew}`;
  $("storyboard").append(item);
}

function showError(message) {
  const item = document.createElement("li");
  item.textContent = message;
  $("errors").append(item);
}

function play(src) {
  const video = $("video");
  if (window.Hls && Hls.isSupported()) {
    const hls = new Hls({ liveSyncDurationCount: 2 });
    hls.on(Hls.Events.ERROR, (_event, data) => {
      if (data.fatal) setTimeout(() => hls.loadSource(src), 1000); // the playlist appears with the first segment
    });
    hls.loadSource(src);
    hls.attachMedia(video);
  } else if (video.canPlayType("application/vnd.apple.mpegurl")) {
    video.src = src;
  }
  video.play().catch(() => {});
}

async function start() {
  const status = await (await fetch("/status")).json();
  showStatus(status);
  showStoryboard(status.storyboard);
  status.errors.forEach(showError);
  if (status.hls) play(status.hls); else { $("video").hidden = true; $("no-video").hidden = false; }
  const events = new EventSource("/events");
  events.onmessage = (message) => {
    const e = JSON.parse(message.data);
    if (e.event === "frame") showStatus(e);
    else if (e.event === "prompt") addScene(e);
    else if (e.event === "error") showError(e.message);
    else if (e.event === "checkpoint") $("state").textContent = `checkpoint at frame ${e.frame}`;
    else if (e.event === "finished") { $("state").textContent = `finished: ${e.frame} frames`; events.close(); }
  };
}

$("prompt-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const prompt = $("prompt-input").value.trim();
  const transition = parseInt($("transition").value || "0", 10);
  const anchor = $("renew").checked ? "renew" : "keep";
  const at = $("at-frame").value;
  $("answer").textContent = "sending...";
  try {
    const response = await fetch("/prompt", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(at === "" ? { prompt, transition, anchor } : { prompt, transition, anchor, frame: parseInt(at, 10) }),
    });
    const answer = await response.json();
    $("answer").textContent = response.ok ? `From frame ${answer.frame}: ${answer.prompt}` : `Refused: ${answer.error}`;
    if (response.ok) { $("prompt-input").value = ""; $("at-frame").value = ""; }
  } catch (err) {
    $("answer").textContent = `Not sent: ${err}`;
  }
});

start();
