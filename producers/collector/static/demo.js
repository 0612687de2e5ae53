/*
 * The demo call: two RTCPeerConnections in one page, each sending fake camera and microphone
 * media (Chromium's --use-fake-device-for-media-stream), connected to each other directly;
 * party A is watched by the Tally SDK. window.demo exposes the call to tests:
 *   demo.tally      the Tally client
 *   demo.ready      resolves once the call is connected (or at once with ?call=0)
 *   demo.endCall()  ends the call and flushes; resolves when the events are sent
 */
(function () {
  "use strict";

  var params = new URLSearchParams(window.location.search);
  var output = function (id, text) { document.getElementById(id).textContent = String(text); };

  var tally = Tally.init({
    endpoint: params.get("endpoint") || "/v1/events",
    writeKey: params.get("key") || "demo-key",
    appId: params.get("app") || "demo.web",
    channel: "dev",
    softwareVersion: "1.0.0",
    consent: params.get("consent") || "full",
    userId: params.get("user") || undefined,
    flushIntervalMs: Number(params.get("flush")) || 2000,
  });
  var intervalMs = Number(params.get("interval")) || 10000;
  var state = { tally: tally, sessionId: null, ready: null, endCall: null };
  window.demo = state;

  function setState(text) {
    document.body.dataset.state = text;
    output("state", text);
  }

  setInterval(function () {
    output("pending", tally.pendingEvents);
    output("sent", tally.sentEvents);
    output("dropped", tally.droppedEvents);
  }, 500);

  tally.clientInfo();
  if (params.get("user")) tally.login({ outcome: "success", authMethod: "password" });

  if (params.get("call") === "0") {
    state.ready = Promise.resolve();
    setState("idle");
    return;
  }

  var a = new RTCPeerConnection();
  var b = new RTCPeerConnection();
  var streams = [];
  var watch = null;

  // Candidates go straight to the other connection in this page: they never reach Tally.
  a.addEventListener("icecandidate", function (e) {
    if (e.candidate) b.addIceCandidate(e.candidate);
  });
  b.addEventListener("icecandidate", function (e) {
    if (e.candidate) a.addIceCandidate(e.candidate);
  });
  a.addEventListener("track", function (e) {
    document.getElementById("remote").srcObject = e.streams[0];
  });

  function media() {
    return navigator.mediaDevices.getUserMedia({ audio: true, video: { width: 640, height: 480 } })
      .then(function (stream) { streams.push(stream); return stream; });
  }

  function connected(pc) {
    return new Promise(function (resolve, reject) {
      function check() {
        if (pc.connectionState === "connected") resolve();
        if (pc.connectionState === "failed") reject(new Error("the call failed to connect"));
      }
      pc.addEventListener("connectionstatechange", check);
      check();
    });
  }

  state.ready = Promise.all([media(), media()]).then(function (both) {
    both[0].getTracks().forEach(function (t) { a.addTrack(t, both[0]); });
    both[1].getTracks().forEach(function (t) { b.addTrack(t, both[1]); });
    watch = tally.watchCall(a, { kind: "video", participants: 2, intervalMs: intervalMs });
    state.sessionId = watch.sessionId;
    output("session", watch.sessionId);
    setState("connecting");
    return a.createOffer();
  }).then(function (offer) {
    return a.setLocalDescription(offer)
      .then(function () { return b.setRemoteDescription(offer); });
  }).then(function () {
    return b.createAnswer();
  }).then(function (answer) {
    return b.setLocalDescription(answer)
      .then(function () { return a.setRemoteDescription(answer); });
  }).then(function () {
    return connected(a);
  }).then(function () {
    setState("connected");
    document.getElementById("end").disabled = false;
  }, function (err) {
    setState("failed");
    throw err;
  });

  state.endCall = function () {
    document.getElementById("end").disabled = true;
    if (watch) watch.stop();
    a.close();
    b.close();
    streams.forEach(function (s) { s.getTracks().forEach(function (t) { t.stop(); }); });
    return tally.flush().then(function (sent) {
      setState(sent ? "ended" : "ended-unsent");
      return sent;
    });
  };
  document.getElementById("end").addEventListener("click", state.endCall);
})();
