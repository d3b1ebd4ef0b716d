//! The parts of Asterisk 22's ARI data model control uses, as serde types, and the rules that
//! read them: which StasisStart is a caller (not one of our own externalMedia channels), and
//! where an externalMedia channel sends its RTP from (its `UNICASTRTP_LOCAL_*` channel variables,
//! whose port is a string).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};

/// Prefix of the channel ids control chooses for its externalMedia channels.
pub const EXTERNAL_MEDIA_PREFIX: &str = "rtprelay-em-";

/// A channel as ARI describes it (the fields control reads).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Channel {
    /// Unique id (Asterisk's, or the one control chose).
    pub id: String,
    /// Channel name, e.g. `PJSIP/alice-00000001` or `UnicastRTP/127.0.0.1:21000-0000002a`.
    pub name: String,
    /// State, e.g. `Ring`, `Up`.
    pub state: String,
    /// Channel variables asked for (externalMedia replies carry `UNICASTRTP_LOCAL_*`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channelvars: Option<HashMap<String, String>>,
    /// Where the channel is in the dialplan (`Stasis` with the application's name while it is
    /// in one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dialplan: Option<Dialplan>,
}

/// A channel's dialplan location.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dialplan {
    /// The application running, e.g. `Stasis`.
    #[serde(default)]
    pub app_name: String,
    /// Its arguments, e.g. `rtp-relay` or `rtp-relay,arg1`.
    #[serde(default)]
    pub app_data: String,
}

impl Channel {
    /// Whether this is one of control's own externalMedia channels (which get a StasisStart
    /// too, and must not be treated as a new call).
    #[must_use]
    pub fn is_ours(&self) -> bool {
        self.id.starts_with(EXTERNAL_MEDIA_PREFIX) || self.name.starts_with("UnicastRTP/")
    }

    /// Whether the channel is in the Stasis application `app` (from its dialplan location).
    #[must_use]
    pub fn in_stasis(&self, app: &str) -> bool {
        self.dialplan.as_ref().is_some_and(|d| {
            d.app_name.eq_ignore_ascii_case("Stasis")
                && d.app_data.split(',').next().map(str::trim) == Some(app)
        })
    }

    /// Where Asterisk sends this externalMedia channel's RTP from.
    ///
    /// # Errors
    /// The variables are missing or not an address and a port (the port comes as a string).
    pub fn rtp_source(&self) -> Result<SocketAddr, AriError> {
        let vars = self
            .channelvars
            .as_ref()
            .ok_or(AriError::MissingVariable("channelvars"))?;
        let ip: IpAddr = vars
            .get("UNICASTRTP_LOCAL_ADDRESS")
            .ok_or(AriError::MissingVariable("UNICASTRTP_LOCAL_ADDRESS"))?
            .parse()
            .map_err(|_| AriError::BadVariable("UNICASTRTP_LOCAL_ADDRESS"))?;
        let port: u16 = vars
            .get("UNICASTRTP_LOCAL_PORT")
            .ok_or(AriError::MissingVariable("UNICASTRTP_LOCAL_PORT"))?
            .parse()
            .ok()
            .filter(|&p| p != 0)
            .ok_or(AriError::BadVariable("UNICASTRTP_LOCAL_PORT"))?;
        Ok(SocketAddr::new(ip, port))
    }
}

/// An event from `/ari/events` (the ones control acts on; the rest are `Other`).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(tag = "type")]
pub enum Event {
    /// A channel entered the application.
    StasisStart {
        /// The channel.
        channel: Channel,
        /// Arguments from the dialplan's `Stasis(app,args…)`.
        #[serde(default)]
        args: Vec<String>,
    },
    /// A channel left the application (hung up, or was moved out).
    StasisEnd {
        /// The channel.
        channel: Channel,
    },
    /// A channel was destroyed.
    ChannelDestroyed {
        /// The channel.
        channel: Channel,
        /// The hang-up cause (Q.850 number, 16 for normal clearing).
        #[serde(default)]
        cause: Option<u32>,
        /// The cause's text (`Normal Clearing`).
        #[serde(default)]
        cause_txt: Option<String>,
    },
    /// Any other event type.
    #[serde(other)]
    Other,
}

/// What ARI sent could not be used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AriError {
    /// A channel variable control needs is absent.
    #[error("the externalMedia reply has no {0}")]
    MissingVariable(&'static str),
    /// A channel variable has a value control cannot read.
    #[error("the externalMedia reply's {0} is malformed")]
    BadVariable(&'static str),
}

/// Parses one WebSocket message.
///
/// # Errors
/// Not a JSON event.
pub fn parse_event(text: &str) -> Result<Event, serde_json::Error> {
    serde_json::from_str(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Shapes as Asterisk 22 sends them (trimmed of fields control ignores).
    const CALLER_START: &str = r#"{"type":"StasisStart","timestamp":"2026-11-21T09:00:00.000+0000",
        "args":[],"channel":{"id":"1732179600.42","name":"PJSIP/load-00000001","state":"Ring",
        "caller":{"name":"","number":"100"},"connected":{"name":"","number":""},"accountcode":"",
        "dialplan":{"context":"load","exten":"s","priority":2,"app_name":"Stasis","app_data":"rtp-relay"},
        "creationtime":"2026-11-21T09:00:00.000+0000","language":"en"},"asterisk_id":"00:00:00:00:00:01",
        "application":"rtp-relay"}"#;
    const EXTERNAL_MEDIA_REPLY: &str = r#"{"id":"rtprelay-em-7f3a","name":"UnicastRTP/127.0.0.1:21000-0000002a",
        "state":"Down","protocol_id":"","caller":{"name":"","number":""},
        "channelvars":{"UNICASTRTP_LOCAL_PORT":"18074","UNICASTRTP_LOCAL_ADDRESS":"127.0.0.1"}}"#;

    #[test]
    fn a_callers_stasis_start_is_a_new_call() {
        let Event::StasisStart { channel, args } = parse_event(CALLER_START).unwrap() else {
            panic!("not StasisStart")
        };
        assert_eq!(channel.id, "1732179600.42");
        assert!(args.is_empty());
        assert!(!channel.is_ours());
        assert!(channel.in_stasis("rtp-relay"));
        assert!(!channel.in_stasis("other"));
    }

    #[test]
    fn external_media_reply_gives_the_rtp_source_from_string_variables() {
        let ch: Channel = serde_json::from_str(EXTERNAL_MEDIA_REPLY).unwrap();
        assert!(ch.is_ours());
        assert_eq!(ch.rtp_source(), Ok("127.0.0.1:18074".parse().unwrap()));
        let mut bad = ch.clone();
        bad.channelvars
            .as_mut()
            .unwrap()
            .insert("UNICASTRTP_LOCAL_PORT".into(), "0".into());
        assert_eq!(
            bad.rtp_source(),
            Err(AriError::BadVariable("UNICASTRTP_LOCAL_PORT"))
        );
        bad.channelvars = None;
        assert_eq!(
            bad.rtp_source(),
            Err(AriError::MissingVariable("channelvars"))
        );
    }

    #[test]
    fn other_events_are_recognised_as_other_and_garbage_is_an_error() {
        assert_eq!(
            parse_event(r#"{"type":"ChannelVarset","variable":"X"}"#).unwrap(),
            Event::Other
        );
        let end = r#"{"type":"StasisEnd","channel":{"id":"a","name":"PJSIP/x","state":"Up"}}"#;
        assert!(matches!(parse_event(end).unwrap(), Event::StasisEnd { .. }));
        assert!(parse_event("not json").is_err());
        assert!(
            parse_event(r#"{"type":"StasisStart"}"#).is_err(),
            "a StasisStart needs its channel"
        );
    }
}
