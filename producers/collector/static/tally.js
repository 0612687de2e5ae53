/**
 * Tally browser SDK: service-quality telemetry for a chat web app, sent to the Tally collector.
 *
 * One file, no dependencies, no build step. What it sends is exactly the event declarations of
 * schemas/events.py, and nothing more (producers/BROWSER_SDK.md):
 *   - it never reads page content, form fields, cookies or the page URL;
 *   - the referrer leaves as its origin only, and never under consent "none";
 *   - browser and OS come from User-Agent Client Hints' low-entropy values (never
 *     getHighEntropyValues), else the User-Agent string, which the stream step parses and drops;
 *   - from WebRTC it reads getStats() numbers only: never SDP, ICE candidates, IP addresses,
 *     track labels or device ids;
 *   - Do Not Track or Global Privacy Control hold consent at "none", whatever the page says.
 * Every network call is in one function, send().
 *
 * Usage:
 *   const tally = Tally.init({endpoint: "https://collector.example/v1/events",
 *     writeKey: "...", appId: "conferendo.web", channel: "stable", softwareVersion: "4.2.1",
 *     consent: "anonymous"});
 *   const call = tally.watchCall(peerConnection, {sessionId, kind: "video"});
 *   ...
 *   call.stop();
 */
(function (global) {
  "use strict";

  /** @typedef {"full" | "anonymous" | "none"} ConsentLevel */
  /** @typedef {"stable" | "beta" | "nightly" | "dev"} Channel */

  /**
   * @typedef {Object} TallyOptions
   * @property {string} writeKey The app's write key (sent as a Bearer token, or ?key= in a beacon).
   * @property {string} appId The app id the key was issued for.
   * @property {string} softwareVersion The web app's version, e.g. "4.2.1".
   * @property {string} [endpoint] URL of the collector's events route (default "/v1/events").
   * @property {Channel} [channel] Release channel (default "stable").
   * @property {ConsentLevel} [consent] What the user agreed to (default "none").
   * @property {string} [userId] The signed-in user's opaque id, if any.
   * @property {number} [flushIntervalMs] How often queued events are sent (default 5000).
   * @property {number} [maxBatch] Most events in one request (default 100).
   * @property {number} [maxQueue] Most events waiting; past it the oldest are dropped (1000).
   * @property {number} [retryBaseMs] First retry delay, doubled per failure (default 1000).
   * @property {number} [retryMaxMs] Longest retry delay (default 60000).
   */

  /**
   * @typedef {Object} WatchOptions
   * @property {string} [sessionId] Opaque id of the call (default: a random UUID).
   * @property {"video" | "audio"} [kind] Default "video".
   * @property {number} [participants] People in the call, bucketed (default 2).
   * @property {number} [intervalMs] getStats() sampling interval (default 10000).
   * @property {"wifi" | "ethernet" | "cellular" | "other" | "unknown"} [networkType]
   */

  /**
   * @typedef {Object} CallWatch
   * @property {string} sessionId
   * @property {() => void} stop Ends the session ("normal") and stops sampling; idempotent.
   */

  var SCHEMA_VERSIONS = {
    login: 1, logout: 1, session_start: 1, session_end: 1, client_info: 1, quality_sample: 2,
  };
  var CONSENT_RANK = { none: 0, anonymous: 1, full: 2 };
  var OPAQUE_ID = /^[A-Za-z0-9_.:-]{1,64}$/;
  var VERSION = /^[0-9]{1,5}(\.[0-9]{1,5}){0,3}([-+][0-9A-Za-z.-]{1,24})?$/;
  var APP_ID = /^[a-z][a-z0-9_.-]{0,47}$/;
  var SHORT_NAME = /^[A-Za-z0-9][A-Za-z0-9._()/-]*( [A-Za-z0-9._()/-]+){0,2}$/;
  var USER_AGENT = /^[A-Za-z][A-Za-z0-9._-]{0,31}\/[\x20-\x7e]{1,480}$/;
  var BEACON_MAX_BYTES = 60000; // browsers allow about 64 KiB of beacons in flight
  var CODECS = { opus: "opus", vp8: "vp8", vp9: "vp9", h264: "h264", av1: "av1" };
  var OS_NAMES = { macos: "Mac OS X", windows: "Windows", linux: "Linux", android: "Android",
    ios: "iOS", "chrome os": "Chrome OS", "chromium os": "Chrome OS" };
  var BRAND_NAMES = { "google chrome": "Chrome", "microsoft edge": "Edge" };

  function oneOf(value, allowed, name) {
    if (allowed.indexOf(value) < 0) {
      throw new TypeError("Tally: " + name + " must be one of " + allowed.join(", "));
    }
    return value;
  }

  function matching(value, pattern, name) {
    if (typeof value !== "string" || !pattern.test(value)) {
      throw new TypeError("Tally: " + name + " is not valid");
    }
    return value;
  }

  /** A finite number clamped to [min, max], to two decimals (finer is noise in a sample). */
  function number(value, min, max, name) {
    if (typeof value !== "number" || !isFinite(value)) {
      throw new TypeError("Tally: " + name + " must be a number");
    }
    return Math.round(Math.min(max, Math.max(min, value)) * 100) / 100;
  }

  function uuid() {
    var c = global.crypto;
    if (c && typeof c.randomUUID === "function") return c.randomUUID();
    var b = c.getRandomValues(new Uint8Array(16)); // outside a secure context
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    var h = Array.prototype.map.call(b, function (x) { return (x + 0x100).toString(16).slice(1); });
    return h.slice(0, 4).join("") + "-" + h.slice(4, 6).join("") + "-" + h.slice(6, 8).join("") +
      "-" + h.slice(8, 10).join("") + "-" + h.slice(10).join("");
  }

  /** Whether the browser carries Do Not Track or Global Privacy Control. */
  function privacySignal() {
    var nav = global.navigator || {};
    return nav.doNotTrack === "1" || nav.globalPrivacyControl === true;
  }

  /** document.referrer cut to its origin; undefined unless http(s). Never the page's own URL. */
  function referrerOrigin() {
    var doc = global.document;
    if (!doc || !doc.referrer) return undefined;
    try {
      var url = new URL(doc.referrer);
      if (url.protocol !== "http:" && url.protocol !== "https:") return undefined;
      return url.origin;
    } catch (e) {
      return undefined;
    }
  }

  function shortName(text) {
    var name = String(text).replace(/[^A-Za-z0-9._()/ -]/g, "").replace(/\s+/g, " ").trim();
    name = name.split(" ").slice(0, 3).join(" ").slice(0, 32).trim();
    return SHORT_NAME.test(name) ? name : undefined;
  }

  /** Browser and OS as envelope fields: UA-CH low-entropy values, else the UA string. */
  function agentFields() {
    var nav = global.navigator || {};
    var data = nav.userAgentData;
    var fields = {};
    if (data && Array.isArray(data.brands) && data.brands.length) {
      var brands = data.brands.filter(function (b) {
        return !/not.?a.?brand/i.test(b.brand); // GREASE entries, e.g. "Not=A?Brand"
      });
      var named = brands.filter(function (b) { return b.brand !== "Chromium"; })[0] ||
        brands[0];
      if (named) {
        var family = shortName(BRAND_NAMES[named.brand.toLowerCase()] || named.brand);
        if (family) fields.browser_family = family;
        if (VERSION.test(String(named.version))) fields.browser_version = String(named.version);
      }
      var os = data.platform ? shortName(OS_NAMES[data.platform.toLowerCase()] || data.platform)
        : undefined;
      if (os) fields.os_family = os;
      if (fields.browser_family) return fields;
    }
    if (typeof nav.userAgent === "string" && USER_AGENT.test(nav.userAgent)) {
      return { user_agent: nav.userAgent };
    }
    return fields;
  }

  function participantsBucket(n) {
    if (n <= 2) return "2";
    if (n <= 5) return "3-5";
    if (n <= 10) return "6-10";
    return "11+";
  }

  function screenClass() {
    var s = global.screen;
    var w = s ? Math.max(s.width || 0, s.height || 0) : 0;
    if (w < 800) return "small";
    if (w < 1400) return "medium";
    if (w < 2200) return "large";
    return "xlarge";
  }

  function resolutionClass(height) {
    var classes = [[240, "240p"], [360, "360p"], [480, "480p"], [720, "720p"],
      [1080, "1080p"], [1440, "1440p"]];
    for (var i = 0; i < classes.length; i++) if (height <= classes[i][0]) return classes[i][1];
    return "2160p";
  }

  function networkTypeOf(raw) {
    var t = String(raw || "").toLowerCase();
    if (t === "wifi" || t === "ethernet" || t === "cellular") return t;
    if (t === "wimax" || t === "bluetooth" || t === "vpn" || t === "other") return "other";
    return "unknown";
  }

  /** Retry-After in ms (seconds or an HTTP date); 0 when absent or unreadable. */
  function retryAfterMs(header) {
    if (!header) return 0;
    var seconds = Number(header);
    if (isFinite(seconds)) return Math.max(0, seconds * 1000);
    var at = Date.parse(header);
    return isFinite(at) ? Math.max(0, at - Date.now()) : 0;
  }

  /**
   * A Tally client. Use Tally.init(options).
   * @param {TallyOptions} options
   * @constructor
   */
  function Client(options) {
    var o = options || {};
    this._endpoint = o.endpoint || "/v1/events";
    this._writeKey = matching(o.writeKey, /^[\x21-\x7e]{1,256}$/, "writeKey");
    this._appId = matching(o.appId, APP_ID, "appId");
    this._channel = oneOf(o.channel || "stable", ["stable", "beta", "nightly", "dev"], "channel");
    this._softwareVersion = matching(o.softwareVersion, VERSION, "softwareVersion");
    this._userId = undefined;
    if (o.userId != null) this.setUserId(o.userId);
    this._flushIntervalMs = o.flushIntervalMs || 5000;
    this._maxBatch = Math.max(1, Math.min(500, o.maxBatch || 100));
    this._maxQueue = Math.max(1, o.maxQueue || 1000);
    this._retryBaseMs = o.retryBaseMs || 1000;
    this._retryMaxMs = o.retryMaxMs || 60000;
    this._consent = "none";
    this._queue = []; // events as they will leave, oldest first
    this._inFlight = null; // the events of the request in hand
    this._failures = 0;
    this._retryAt = 0;
    this._closed = false;
    /** Events dropped from a full queue (the oldest first). */
    this.droppedEvents = 0;
    /** Events the collector refused for good (an invalid event, a 4xx for the request). */
    this.rejectedEvents = 0;
    /** Events the collector accepted. */
    this.sentEvents = 0;
    this.setConsent(o.consent || "none");
    this._agent = agentFields();
    var self = this;
    this._timer = setInterval(function () { self._tick(); }, this._flushIntervalMs);
    this._onHide = function (event) {
      if (event.type === "pagehide" || global.document.visibilityState === "hidden") {
        self._beacon();
      }
    };
    global.addEventListener("pagehide", this._onHide);
    global.document.addEventListener("visibilitychange", this._onHide);
  }

  Object.defineProperty(Client.prototype, "pendingEvents", {
    /** Events waiting to be sent, including those of a request in hand. */
    get: function () { return this._queue.length; },
  });

  Object.defineProperty(Client.prototype, "consent", {
    /** The consent in force: the page's choice, held at "none" by DNT or GPC. */
    get: function () { return this._consent; },
  });

  /**
   * Set the user's consent. A narrower level applies at once to events still queued; a
   * wider one only to events made from now on. DNT or GPC hold it at "none".
   * @param {ConsentLevel} level
   */
  Client.prototype.setConsent = function (level) {
    oneOf(level, ["full", "anonymous", "none"], "consent");
    var effective = privacySignal() ? "none" : level;
    this._consent = effective;
    for (var i = 0; i < this._queue.length; i++) this._narrow(this._queue[i], effective);
  };

  /** @param {string | null} userId The signed-in user's opaque id; null once signed out. */
  Client.prototype.setUserId = function (userId) {
    this._userId = userId == null ? undefined : matching(userId, OPAQUE_ID, "userId");
  };

  Client.prototype._narrow = function (event, level) {
    if (CONSENT_RANK[level] < CONSENT_RANK[event.consent]) event.consent = level;
    if (event.consent === "none") {
      delete event.user_id;
      delete event.referrer;
    }
  };

  /** Queue one event of a declared type; the envelope is filled in here. */
  Client.prototype._emit = function (type, fields, userId) {
    if (this._closed) return;
    var event = {
      event_id: uuid(),
      event_type: type,
      schema_version: SCHEMA_VERSIONS[type],
      client_time_ms: Date.now(),
      app_id: this._appId,
      channel: this._channel,
      software_version: this._softwareVersion,
      consent: privacySignal() ? "none" : this._consent,
    };
    var user = userId != null ? matching(userId, OPAQUE_ID, "userId") : this._userId;
    if (user) event.user_id = user;
    var referrer = referrerOrigin();
    if (referrer) event.referrer = referrer;
    var key;
    for (key in this._agent) event[key] = this._agent[key];
    for (key in fields) if (fields[key] !== undefined && fields[key] !== null) {
      event[key] = fields[key];
    }
    this._narrow(event, event.consent);
    this._queue.push(event);
    while (this._queue.length > this._maxQueue) {
      var dropped = this._queue.shift();
      this.droppedEvents++;
      if (this._inFlight) {
        var at = this._inFlight.indexOf(dropped);
        if (at >= 0) this._inFlight.splice(at, 1);
      }
    }
    if (this._queue.length >= this._maxBatch) this._tick();
  };

  /**
   * A login attempt.
   * @param {{outcome: "success" | "failure", authMethod: "password" | "sso" | "token" | "mfa",
   *   failureReason?: string, userId?: string}} p
   */
  Client.prototype.login = function (p) {
    var failure = oneOf(p.outcome, ["success", "failure"], "outcome") === "failure";
    this._emit("login", {
      outcome: p.outcome,
      auth_method: oneOf(p.authMethod, ["password", "sso", "token", "mfa"], "authMethod"),
      failure_reason: failure ? oneOf(p.failureReason, ["bad_credentials", "unknown_account",
        "locked", "expired", "mfa_failed", "rate_limited", "server_error", "network_error"],
      "failureReason") : undefined,
    }, p.userId);
  };

  /** @param {{reason: "user" | "timeout" | "forced", userId?: string}} p */
  Client.prototype.logout = function (p) {
    this._emit("logout", {
      logout_reason: oneOf(p.reason, ["user", "timeout", "forced"], "reason"),
    }, p.userId);
  };

  /**
   * @param {{sessionId: string, kind: "video" | "audio" | "text", participants?: number}} p
   */
  Client.prototype.sessionStart = function (p) {
    this._emit("session_start", {
      session_id: matching(p.sessionId, OPAQUE_ID, "sessionId"),
      session_kind: oneOf(p.kind, ["video", "audio", "text"], "kind"),
      participants_bucket: participantsBucket(p.participants || 2),
    });
  };

  /**
   * @param {{sessionId: string, endReason: "normal" | "dropped" | "error", durationMs: number,
   *   errorCode?: string}} p
   */
  Client.prototype.sessionEnd = function (p) {
    this._emit("session_end", {
      session_id: matching(p.sessionId, OPAQUE_ID, "sessionId"),
      end_reason: oneOf(p.endReason, ["normal", "dropped", "error"], "endReason"),
      error_code: p.errorCode == null ? undefined
        : matching(p.errorCode, /^[A-Z0-9_]{1,32}$/, "errorCode"),
      duration_ms: Math.round(number(p.durationMs, 0, 7 * 24 * 3600000, "durationMs")),
    });
  };

  /**
   * What the client runs on; send once at start-up. Screen size is bucketed.
   * @param {{platform?: "windows" | "macos" | "linux" | "android" | "ios" | "web"}} [p]
   */
  Client.prototype.clientInfo = function (p) {
    this._emit("client_info", {
      platform: oneOf((p && p.platform) || "web",
        ["windows", "macos", "linux", "android", "ios", "web"], "platform"),
      screen_class: screenClass(),
    });
  };

  /**
   * One call-quality sample (watchCall makes these from getStats()).
   * @param {{sessionId: string, rttMs: number, jitterMs: number, packetLossPct: number,
   *   bitrateKbps: number, frameRate?: number, resolutionClass?: string,
   *   networkType?: string, codec?: string, mos?: number}} p
   */
  Client.prototype.qualitySample = function (p) {
    this._emit("quality_sample", {
      session_id: matching(p.sessionId, OPAQUE_ID, "sessionId"),
      rtt_ms: number(p.rttMs, 0, 60000, "rttMs"),
      jitter_ms: number(p.jitterMs, 0, 60000, "jitterMs"),
      packet_loss_pct: number(p.packetLossPct, 0, 100, "packetLossPct"),
      bitrate_kbps: number(p.bitrateKbps, 0, 1000000, "bitrateKbps"),
      frame_rate: p.frameRate == null ? undefined : number(p.frameRate, 0, 240, "frameRate"),
      resolution_class: p.resolutionClass == null ? undefined : oneOf(p.resolutionClass,
        ["audio_only", "240p", "360p", "480p", "720p", "1080p", "1440p", "2160p"],
        "resolutionClass"),
      network_type: oneOf(p.networkType || "unknown",
        ["wifi", "ethernet", "cellular", "other", "unknown"], "networkType"),
      codec: p.codec == null ? undefined : oneOf(p.codec, ["opus", "vp8", "vp9", "h264", "av1"],
        "codec"),
      mos: p.mos == null ? undefined : number(p.mos, 1, 5, "mos"),
    });
  };

  /**
   * Send what is queued now, batch after batch, ignoring any backoff in progress.
   * @returns {Promise<boolean>} true once the queue is empty; false when a send failed (the
   *   events stay queued and are retried with backoff).
   */
  Client.prototype.flush = function () {
    var self = this;
    this._retryAt = 0;
    return (this._sending || Promise.resolve()).then(function loop() {
      if (!self._queue.length) return true;
      return self._sendBatch().then(function (ok) { return ok ? loop() : false; });
    });
  };

  /** Stop timers and listeners; hand what is queued to a beacon. */
  Client.prototype.close = function () {
    if (this._closed) return;
    this._beacon();
    this._closed = true;
    clearInterval(this._timer);
    global.removeEventListener("pagehide", this._onHide);
    global.document.removeEventListener("visibilitychange", this._onHide);
  };

  Client.prototype._tick = function () {
    if (this._closed || this._sending || !this._queue.length) return;
    if (Date.now() < this._retryAt) return;
    this._sendBatch();
  };

  /** One request for the oldest queued events; resolves whether it was answered for good. */
  Client.prototype._sendBatch = function () {
    if (this._sending) return this._sending;
    var self = this;
    var batch = this._queue.slice(0, this._maxBatch);
    this._inFlight = batch;
    this._sending = send(this._endpoint, this._writeKey, JSON.stringify(batch), false)
      .then(function (answer) {
        var done = self._inFlight; // without the events dropped meanwhile
        if (answer.status >= 200 && answer.status < 300) {
          var refused = (answer.body && answer.body.refused) || [];
          self.sentEvents += done.length - refused.length;
          self.rejectedEvents += refused.length;
        } else if (answer.status >= 400 && answer.status < 500 && answer.status !== 408 &&
            answer.status !== 429) {
          self.rejectedEvents += done.length; // no retry can fix it
        } else {
          self._failures++;
          var backoff = Math.min(self._retryMaxMs,
            self._retryBaseMs * Math.pow(2, self._failures - 1));
          var wait = Math.max(backoff / 2 + Math.random() * backoff / 2, answer.retryAfterMs);
          self._retryAt = Date.now() + wait;
          return false;
        }
        self._failures = 0;
        self._queue = self._queue.filter(function (e) { return done.indexOf(e) < 0; });
        return true;
      })
      .then(function (ok) {
        self._sending = null;
        self._inFlight = null;
        return ok;
      });
    return this._sending;
  };

  /** Everything queued handed to navigator.sendBeacon (the page is going away). */
  Client.prototype._beacon = function () {
    while (this._queue.length) {
      var count = Math.min(this._queue.length, this._maxBatch);
      var body = JSON.stringify(this._queue.slice(0, count));
      while (count > 1 && body.length > BEACON_MAX_BYTES) {
        count = Math.ceil(count / 2);
        body = JSON.stringify(this._queue.slice(0, count));
      }
      if (!send(this._endpoint, this._writeKey, body, true)) return; // kept for later
      this._queue.splice(0, count);
    }
  };

  /**
   * Every network call of the SDK. A beacon (the page is going away) carries the key in the
   * query string, since it cannot set headers, and goes as text/plain, which needs no CORS
   * preflight; it returns whether the browser took it. Otherwise a fetch, resolving to
   * {status, body, retryAfterMs}, status 0 for a network error. It never sends cookies.
   */
  function send(endpoint, writeKey, body, beacon) {
    if (beacon) {
      var nav = global.navigator;
      if (!nav || typeof nav.sendBeacon !== "function") return false;
      var url = endpoint + (endpoint.indexOf("?") < 0 ? "?" : "&") + "key=" +
        encodeURIComponent(writeKey);
      try {
        return nav.sendBeacon(url, body);
      } catch (e) {
        return false;
      }
    }
    return global.fetch(endpoint, {
      method: "POST",
      body: body,
      headers: { "Content-Type": "application/json", Authorization: "Bearer " + writeKey },
      credentials: "omit",
      mode: "cors",
      referrerPolicy: "no-referrer",
    }).then(function (response) {
      var retry = retryAfterMs(response.headers.get("Retry-After"));
      return response.json().catch(function () { return null; }).then(function (json) {
        return { status: response.status, body: json, retryAfterMs: retry };
      });
    }, function () {
      return { status: 0, body: null, retryAfterMs: 0 };
    });
  }

  /**
   * Watch a call's RTCPeerConnection: session_start once it connects, a quality_sample from
   * getStats() every intervalMs, session_end when it fails ("dropped"), closes or stop() is
   * called ("normal"). Only numbers and the codec name are read from the stats.
   * @param {RTCPeerConnection} pc
   * @param {WatchOptions} [options]
   * @returns {CallWatch}
   */
  Client.prototype.watchCall = function (pc, options) {
    var o = options || {};
    var self = this;
    var sessionId = o.sessionId == null ? uuid() : matching(o.sessionId, OPAQUE_ID, "sessionId");
    var kind = oneOf(o.kind || "video", ["video", "audio"], "kind");
    var intervalMs = o.intervalMs || 10000;
    var startedAt = 0; // Date.now() when connected; 0 before
    var ended = false;
    var timer = null;
    var previous = null; // the totals of the previous sample

    function end(reason, errorCode) {
      if (ended) return;
      ended = true;
      clearInterval(timer);
      pc.removeEventListener("connectionstatechange", onState);
      if (startedAt) {
        self.sessionEnd({ sessionId: sessionId, endReason: reason, errorCode: errorCode,
          durationMs: Date.now() - startedAt });
      }
    }

    function onState() {
      var state = pc.connectionState;
      if (state === "connected" && !startedAt && !ended) {
        startedAt = Date.now();
        self.sessionStart({ sessionId: sessionId, kind: kind, participants: o.participants });
        totals(pc, kind).then(function (t) { previous = previous || t; });
        timer = setInterval(sample, intervalMs);
      } else if (state === "failed") {
        end("dropped", "CONNECTION_FAILED");
      } else if (state === "closed") {
        end("normal");
      }
    }

    function sample() {
      if (ended) return;
      if (pc.connectionState === "closed") return end("normal"); // close() fires no event
      totals(pc, kind).then(function (now) {
        if (!now) return;
        var before = previous;
        previous = now;
        if (ended || !before || now.rttMs == null) return;
        var seconds = (now.at - before.at) / 1000;
        if (seconds <= 0) return;
        var received = now.packetsReceived - before.packetsReceived;
        var lost = Math.max(0, now.packetsLost - before.packetsLost);
        var frames = now.framesDecoded - before.framesDecoded;
        self.qualitySample({
          sessionId: sessionId,
          rttMs: now.rttMs,
          jitterMs: now.jitterMs,
          packetLossPct: received + lost > 0 ? (100 * lost) / (received + lost) : 0,
          bitrateKbps: Math.max(0, (now.bytesReceived - before.bytesReceived) * 8 / seconds / 1000),
          frameRate: now.hasVideo ? (now.framesPerSecond != null ? now.framesPerSecond
            : Math.max(0, frames / seconds)) : undefined,
          resolutionClass: now.frameHeight ? resolutionClass(now.frameHeight)
            : (now.hasVideo ? undefined : "audio_only"),
          codec: now.codec,
          networkType: o.networkType || now.networkType,
        });
      });
    }

    pc.addEventListener("connectionstatechange", onState);
    onState();
    return { sessionId: sessionId, stop: function () { end("normal"); } };
  };

  /**
   * Cumulative numbers of a connection's getStats(): the selected candidate pair's RTT, the
   * inbound RTP streams' jitter, packets, bytes and frames, the codec and network type. Of
   * the candidate stats only networkType is read; addresses are never touched.
   */
  function totals(pc, kind) {
    return pc.getStats().then(function (report) {
      var t = { at: Date.now(), rttMs: null, jitterMs: 0, packetsReceived: 0, packetsLost: 0,
        bytesReceived: 0, framesDecoded: 0, framesPerSecond: null, frameHeight: 0,
        hasVideo: false, codec: undefined, networkType: "unknown" };
      var pair = null;
      var codecIds = {};
      report.forEach(function (s) {
        if (s.type === "transport" && s.selectedCandidatePairId) {
          pair = report.get(s.selectedCandidatePairId) || pair;
        }
      });
      report.forEach(function (s) {
        if (!pair && s.type === "candidate-pair" && s.nominated && s.state === "succeeded") {
          pair = s;
        }
        if (s.type === "inbound-rtp") {
          t.jitterMs = Math.max(t.jitterMs, (s.jitter || 0) * 1000);
          t.packetsReceived += s.packetsReceived || 0;
          t.packetsLost += s.packetsLost || 0;
          t.bytesReceived += s.bytesReceived || 0;
          if (s.kind === "video") {
            t.hasVideo = true;
            t.framesDecoded += s.framesDecoded || 0;
            if (s.framesPerSecond != null) t.framesPerSecond = s.framesPerSecond;
            t.frameHeight = Math.max(t.frameHeight, s.frameHeight || 0);
          }
          if (s.codecId) codecIds[s.kind] = s.codecId;
        }
      });
      var codec = report.get(codecIds[kind] || codecIds.audio || codecIds.video || "");
      if (codec && codec.mimeType) {
        t.codec = CODECS[String(codec.mimeType).split("/")[1].toLowerCase()];
      }
      if (pair && typeof pair.currentRoundTripTime === "number") {
        t.rttMs = pair.currentRoundTripTime * 1000;
        var local = report.get(pair.localCandidateId);
        if (local && local.networkType) t.networkType = networkTypeOf(local.networkType);
      }
      var connection = global.navigator && global.navigator.connection;
      if (connection && connection.type) t.networkType = networkTypeOf(connection.type);
      return t;
    }, function () {
      return null; // a closed connection: no sample
    });
  }

  /**
   * The entry point.
   * @type {{init: function(TallyOptions): Client, Client: typeof Client}}
   */
  global.Tally = {
    /** @param {TallyOptions} options @returns {Client} */
    init: function (options) { return new Client(options); },
    Client: Client,
  };
})(typeof window !== "undefined" ? window : this);
