//! Just enough of rtpengine's ng control protocol (bencoded dictionaries over UDP, each message
//! prefixed by a cookie) to set up calls that forward loadgen ↔ echo exactly like the relay does:
//! an `offer` with loadgen's SDP, an `answer` with the echo's, and a `delete` at the end.

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use serde::{Deserialize, Serialize};

/// An ng request. Absent fields are left out; `serde_bencode` writes the keys sorted, as
/// bencode requires.
#[derive(Clone, Debug, Default, Serialize)]
pub(crate) struct Request<'a> {
    /// `ping`, `offer`, `answer`, `delete`.
    pub(crate) command: &'a str,
    /// The call.
    #[serde(rename = "call-id", skip_serializing_if = "Option::is_none")]
    pub(crate) call_id: Option<&'a str>,
    /// The offering side's tag.
    #[serde(rename = "from-tag", skip_serializing_if = "Option::is_none")]
    pub(crate) from_tag: Option<&'a str>,
    /// The answering side's tag.
    #[serde(rename = "to-tag", skip_serializing_if = "Option::is_none")]
    pub(crate) to_tag: Option<&'a str>,
    /// The side's SDP.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) sdp: Option<&'a str>,
    /// What to do with ICE attributes (`remove`).
    #[serde(rename = "ICE", skip_serializing_if = "Option::is_none")]
    pub(crate) ice: Option<&'a str>,
    /// Flags such as `asymmetric`.
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    pub(crate) flags: &'a [&'a str],
}

/// What rtpengine answers (fields this client does not read are ignored).
#[derive(Clone, Debug, Deserialize)]
pub(crate) struct Reply {
    /// `ok`, `pong` or `error`.
    pub(crate) result: String,
    /// Why, when `result` is `error`.
    #[serde(rename = "error-reason", default)]
    pub(crate) error_reason: Option<String>,
    /// rtpengine's SDP, for `offer` and `answer`.
    #[serde(default)]
    pub(crate) sdp: Option<String>,
}

/// A client of rtpengine's ng port.
#[derive(Debug)]
pub(crate) struct NgClient {
    sock: UdpSocket,
    next: u64,
}

impl NgClient {
    /// A client talking to `ng`.
    ///
    /// # Errors
    /// The socket cannot be made.
    pub(crate) fn new(ng: SocketAddr) -> anyhow::Result<Self> {
        let sock = UdpSocket::bind("127.0.0.1:0")?;
        sock.connect(ng)?;
        sock.set_read_timeout(Some(Duration::from_secs(2)))?;
        Ok(Self { sock, next: 1 })
    }

    /// Sends `request`; returns the reply (an error if its result is not `ok` or `pong`).
    ///
    /// # Errors
    /// No reply, or an error reply.
    pub(crate) fn call(&mut self, request: &Request<'_>) -> anyhow::Result<Reply> {
        let command = request.command;
        let cookie = format!("c{}", self.next);
        self.next += 1;
        let mut msg = format!("{cookie} ").into_bytes();
        msg.extend(serde_bencode::to_bytes(request)?);
        self.sock.send(&msg)?;
        let mut buf = vec![0u8; 65_536];
        loop {
            let n = loop {
                match self.sock.recv(&mut buf) {
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    r => break r,
                }
            }
            .with_context(|| format!("no reply from rtpengine to `{command}`"))?;
            let reply = buf.get(..n).unwrap_or_default();
            let Some(body) = reply.strip_prefix(format!("{cookie} ").as_bytes()) else {
                continue; // a late reply to an earlier request
            };
            let v: Reply = serde_bencode::from_bytes(body)
                .with_context(|| format!("rtpengine's reply to `{command}`"))?;
            match v.result.as_str() {
                "ok" | "pong" => return Ok(v),
                _ => bail!(
                    "rtpengine refused `{command}`: {}",
                    v.error_reason.unwrap_or_default()
                ),
            }
        }
    }
}

/// A one-stream audio SDP for `addr`.
#[must_use]
pub(crate) fn sdp(addr: SocketAddr, session: u64) -> String {
    format!(
        "v=0\r\no=- {session} 1 IN IP4 {ip}\r\ns=bench\r\nc=IN IP4 {ip}\r\nt=0 0\r\n\
         m=audio {port} RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\na=sendrecv\r\n",
        ip = addr.ip(),
        port = addr.port()
    )
}

/// The media address an SDP announces (`c=` and the first `m=audio`).
///
/// # Errors
/// The SDP has no usable address.
pub(crate) fn media_addr(sdp: &str) -> anyhow::Result<SocketAddr> {
    let ip = sdp
        .lines()
        .find_map(|l| l.trim().strip_prefix("c=IN IP4 "))
        .ok_or_else(|| anyhow!("SDP without c=IN IP4"))?;
    let port = sdp
        .lines()
        .find_map(|l| l.trim().strip_prefix("m=audio "))
        .and_then(|l| l.split_whitespace().next())
        .ok_or_else(|| anyhow!("SDP without m=audio"))?;
    Ok(SocketAddr::new(ip.trim().parse()?, port.parse()?))
}

/// Sets up call `i`: loadgen at `caller`, echo at `callee`; returns the address loadgen must
/// send to.
///
/// # Errors
/// rtpengine refused or did not answer.
pub(crate) fn setup_call(
    ng: &mut NgClient,
    i: usize,
    caller: SocketAddr,
    callee: SocketAddr,
) -> anyhow::Result<SocketAddr> {
    let call = format!("bench-{i}");
    let flags = ["asymmetric"];
    let offer_sdp = sdp(caller, i as u64);
    let offer = ng.call(&Request {
        command: "offer",
        call_id: Some(&call),
        from_tag: Some("caller"),
        sdp: Some(&offer_sdp),
        ice: Some("remove"),
        flags: &flags,
        ..Request::default()
    })?;
    offer
        .sdp
        .ok_or_else(|| anyhow!("offer reply without SDP"))?;
    let answer_sdp = sdp(callee, i as u64 + 1_000_000);
    let answer = ng.call(&Request {
        command: "answer",
        call_id: Some(&call),
        from_tag: Some("caller"),
        to_tag: Some("callee"),
        sdp: Some(&answer_sdp),
        ice: Some("remove"),
        flags: &flags,
    })?;
    media_addr(
        &answer
            .sdp
            .ok_or_else(|| anyhow!("answer reply without SDP"))?,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_canonical_bencode_and_replies_decode() {
        let flags = ["asymmetric"];
        let r = Request {
            command: "offer",
            call_id: Some("c"),
            sdp: Some("v=0"),
            flags: &flags,
            ..Request::default()
        };
        assert_eq!(
            serde_bencode::to_bytes(&r).unwrap(),
            b"d7:call-id1:c7:command5:offer5:flagsl10:asymmetrice3:sdp3:v=0e"
        );
        let ping = serde_bencode::to_bytes(&Request {
            command: "ping",
            ..Request::default()
        })
        .unwrap();
        assert_eq!(ping, b"d7:command4:pinge");
        let reply: Reply =
            serde_bencode::from_bytes(b"d7:createdi1e6:result5:error12:error-reason4:nopee")
                .unwrap();
        assert_eq!(
            (reply.result.as_str(), reply.error_reason.as_deref()),
            ("error", Some("nope"))
        );
        for bad in [&b""[..], b"x", b"5:ab", b"i12", b"d1:a", b"d6:resulti1ee"] {
            assert!(serde_bencode::from_bytes::<Reply>(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn sdp_media_address_is_read_back() {
        let a: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        assert_eq!(media_addr(&sdp(a, 1)).unwrap(), a);
        assert!(media_addr("v=0\r\n").is_err());
    }
}
