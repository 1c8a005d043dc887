//! The `exec` provider: any key service through a helper program the operator supplies,
//! speaking JSON lines on its stdin and stdout (README, "The exec protocol").
//!
//! Owns: starting the helper (once; again after it exits), one request line and one answer
//! line at a time, and classing answers: `{"error":"denied"}` is `Denied`; an
//! `{"error":"unavailable"}`, a helper that cannot start, exits, hangs past the call timeout
//! or answers garbage is `Unavailable`.
//! Must never: put a key in an error message, or let the helper's stderr reach a log line
//! beyond what it says itself (it inherits pullgate's stderr).

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use serde_json::{json, Value};

use super::provider::{Provider, ProviderError, Wrapped};
use crate::crypt::{SecretKey, KEY_LEN};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

pub struct ExecProvider {
    command: Vec<String>,
    helper: Arc<Mutex<Option<Helper>>>,
}

struct Helper {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Drop for Helper {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl ExecProvider {
    pub fn new(command: Vec<String>) -> ExecProvider {
        ExecProvider {
            command,
            helper: Arc::new(Mutex::new(None)),
        }
    }

    /// One request, one answer line; blocking, so run on the blocking pool.
    async fn call(&self, request: Value) -> Result<Value, ProviderError> {
        let helper = Arc::clone(&self.helper);
        let command = self.command.clone();
        let op = request["op"].as_str().unwrap_or("?").to_owned();
        let answer = tokio::task::spawn_blocking(move || {
            let mut slot = helper.lock().unwrap_or_else(|e| e.into_inner());
            let result = exchange(&mut slot, &command, &request);
            if result.is_err() {
                // A helper that failed once is started afresh for the next call.
                *slot = None;
            }
            result
        })
        .await
        .map_err(|e| ProviderError::Unavailable(format!("exec helper task: {e}")))?
        .map_err(|why| ProviderError::Unavailable(format!("exec helper ({op}): {why}")))?;
        match answer["error"].as_str() {
            None => Ok(answer),
            Some(kind) => {
                let message = answer["message"].as_str().unwrap_or("").to_owned();
                let message = format!("exec helper ({op}): {kind}: {message}");
                Err(match kind {
                    "denied" => ProviderError::Denied(message),
                    _ => ProviderError::Unavailable(message),
                })
            }
        }
    }
}

fn exchange(
    slot: &mut Option<Helper>,
    command: &[String],
    request: &Value,
) -> Result<Value, String> {
    if slot.is_none() {
        let (program, args) = command.split_first().ok_or("no command")?;
        let mut child = Command::new(program)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("cannot start {program}: {e}"))?;
        let stdin = child.stdin.take().ok_or("no stdin")?;
        let stdout = BufReader::new(child.stdout.take().ok_or("no stdout")?);
        *slot = Some(Helper {
            child,
            stdin,
            stdout,
        });
    }
    let helper = slot.as_mut().ok_or("no helper")?;
    let mut line = request.to_string();
    line.push('\n');
    helper
        .stdin
        .write_all(line.as_bytes())
        .and_then(|()| helper.stdin.flush())
        .map_err(|e| format!("writing to the helper: {e}"))?;
    let mut answer = String::new();
    let n = helper
        .stdout
        .read_line(&mut answer)
        .map_err(|e| format!("reading from the helper: {e}"))?;
    if n == 0 {
        return Err("the helper exited".into());
    }
    serde_json::from_str(&answer).map_err(|_| "the helper's answer is not one JSON line".into())
}

fn field(answer: &Value, name: &str) -> Result<String, ProviderError> {
    answer[name].as_str().map(str::to_owned).ok_or_else(|| {
        ProviderError::Unavailable(format!("exec helper: no \"{name}\" in the answer"))
    })
}

fn wrapped_from(answer: &Value) -> Result<Wrapped, ProviderError> {
    Ok(Wrapped {
        kek_version: field(answer, "kek_version")?,
        ciphertext: field(answer, "ciphertext")?,
    })
}

#[async_trait::async_trait]
impl Provider for ExecProvider {
    fn kind(&self) -> &'static str {
        "exec"
    }

    fn identity(&self) -> String {
        format!("exec:{}", self.command.join(" "))
    }

    async fn status(&self) -> Result<String, ProviderError> {
        let answer = self.call(json!({ "op": "status" })).await?;
        field(&answer, "kek_version")
    }

    async fn wrap(&self, key: &SecretKey) -> Result<Wrapped, ProviderError> {
        let answer = self
            .call(json!({ "op": "wrap", "key": B64.encode(key.expose()) }))
            .await?;
        wrapped_from(&answer)
    }

    async fn unwrap(&self, wrapped: &Wrapped) -> Result<SecretKey, ProviderError> {
        let answer = self
            .call(json!({
                "op": "unwrap",
                "kek_version": wrapped.kek_version,
                "ciphertext": wrapped.ciphertext,
            }))
            .await?;
        let mut raw = B64
            .decode(field(&answer, "key")?)
            .map_err(|_| ProviderError::Unavailable("exec helper: key is not base64".into()))?;
        let key = <[u8; KEY_LEN]>::try_from(raw.as_slice())
            .map_err(|_| ProviderError::Unavailable("exec helper: key is not 32 bytes".into()));
        zeroize::Zeroize::zeroize(&mut raw);
        key.map(SecretKey::from_bytes)
    }

    async fn rewrap(&self, wrapped: &Wrapped) -> Result<Option<Wrapped>, ProviderError> {
        let answer = self
            .call(json!({
                "op": "rewrap",
                "kek_version": wrapped.kek_version,
                "ciphertext": wrapped.ciphertext,
            }))
            .await;
        match answer {
            Ok(answer) => wrapped_from(&answer).map(Some),
            // "unsupported" (or any other unknown error kind) means: wrap it yourself.
            Err(ProviderError::Unavailable(m)) if m.contains(": unsupported:") => Ok(None),
            Err(e) => Err(e),
        }
    }
}
