//! Enrollment: a new agent or relay presents a live token and its public key, and gets its
//! record; a retried install presenting the same (possibly spent) token gets the same record
//! back, and changes to what a token decided (tags, a relay's certificate) need a new use.

use super::*;

/// What a relay's certificate is issued for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Certified {
    /// Standard base64 of the raw P-256 public key.
    pub(super) tls_public_key: String,
    /// The certificate's names, in the order asked.
    pub(super) hostnames: Vec<String>,
}

impl Certified {
    fn of(req: &EnrollRequest) -> Option<Certified> {
        req.tls_public_key.as_ref().map(|key| Certified {
            tls_public_key: key.clone(),
            hostnames: req.hostnames.clone(),
        })
    }
}

impl Registry {
    /// Enrolls the peer `req` describes, consuming one use of its token; an identical retry
    /// (same name, key and role, with a valid token or the token it enrolled with) returns the
    /// existing record and consumes nothing.
    pub async fn enroll(&self, req: EnrollRequest) -> Result<AgentRecord, RegistryError> {
        self.enroll_at(req, now_unix_ms()).await
    }

    pub(super) async fn enroll_at(
        &self,
        req: EnrollRequest,
        now_ms: u64,
    ) -> Result<AgentRecord, RegistryError> {
        if let Some(problem) = name_problem("name", &req.name).or_else(|| tags_problem(&req.tags)) {
            return Err(RegistryError::Invalid(problem));
        }
        let public_key = PublicKey::from_b64(&req.public_key)
            .map_err(|e| RegistryError::Invalid(e.to_string()))?
            .to_b64();
        // Hashing first means the lookup never compares the secret itself.
        let hash = if req.token.len() <= MAX_TOKEN_LEN {
            Some(token_sha256(&req.token))
        } else {
            None
        };

        let _change = self.changes.lock().await;
        let token = hash
            .as_ref()
            .and_then(|h| read(&self.tokens).get(h).copied())
            .filter(|t| t.accepts(req.role, now_ms));
        let (same_name, same_key) = {
            let agents = read(&self.agents);
            let same_name = agents.values().find(|s| s.record.name == req.name).cloned();
            let same_key = agents
                .values()
                .any(|s| s.record.public_key == public_key && s.record.name != req.name);
            (same_name, same_key)
        };
        let certified = Certified::of(&req);
        if let Some(existing) = &same_name {
            let identical =
                existing.record.public_key == public_key && existing.record.role == req.role;
            let entitled =
                token.is_some() || hash.as_deref() == Some(existing.token_sha256.as_str());
            if identical && entitled {
                if existing.certified == certified && existing.record.tags == req.tags {
                    // A retry: nothing new is asked, so nothing is spent. A relay is certified
                    // again only for the key and names it already holds a certificate for.
                    tracing::info!(agent_id = %existing.record.id, name = %req.name, "agent-re-enrolled");
                    return Ok(existing.record.clone());
                }
                // Other tags (which choose the work an agent gets), or for a relay another key
                // or other names: the operator's say-so, a live token, is needed, and one use
                // of it is spent. The key holder alone cannot change them.
                let (Some(token), Some(hash)) = (token, hash) else {
                    return Err(if existing.certified != certified {
                        RegistryError::CertificateChange
                    } else {
                        RegistryError::TagsChange
                    });
                };
                // A new key or new names: the old certificate is not theirs.
                let certificate = existing
                    .certificate
                    .clone()
                    .filter(|_| existing.certified == certified);
                let mut stored = StoredAgent {
                    certified,
                    certificate,
                    ..existing.clone()
                };
                stored.record.tags = req.tags;
                let left = self.commit_enrollment(&stored, token, &hash).await?;
                tracing::info!(agent_id = %stored.record.id, name = %req.name, tags = ?stored.record.tags, uses_left = left, "agent-re-enrolled-changed");
                return Ok(stored.record);
            }
        }
        let (Some(token), Some(hash)) = (token, hash) else {
            return Err(RegistryError::InvalidToken);
        };
        if same_name.is_some() {
            return Err(RegistryError::NameTaken);
        }
        if same_key {
            return Err(RegistryError::KeyTaken);
        }

        let id = self.new_id(req.role);
        let stored = StoredAgent {
            record: AgentRecord {
                id: AgentId::from(id.clone()),
                name: req.name,
                public_key,
                tags: req.tags,
                properties: BTreeMap::new(),
                role: req.role,
                enrolled_unix_ms: now_ms,
                maintenance: None,
                max_running_jobs: None,
                facts: Facts::new(),
                facts_unix_ms: 0,
            },
            token_sha256: hash.clone(),
            certified,
            certificate: None,
            trust_serial: 0,
        };
        let left = self.commit_enrollment(&stored, token, &hash).await?;
        let record = stored.record;
        tracing::info!(agent_id = %id, name = %record.name, role = %record.role, uses_left = left, "agent-enrolled");
        Ok(record)
    }

    /// Commits `stored` with one use less of the token `hash`, then applies both; returns the
    /// uses left. The caller holds the change lock.
    async fn commit_enrollment(
        &self,
        stored: &StoredAgent,
        token: StoredToken,
        hash: &str,
    ) -> Result<u32, RegistryError> {
        let token_key = format!("{TOKEN_PREFIX}{hash}");
        let left = token.uses_left.saturating_sub(1);
        let token_op = if left == 0 {
            Op::DeleteMeta { key: token_key }
        } else {
            Op::PutMeta {
                key: token_key,
                value: encode(&StoredToken {
                    uses_left: left,
                    ..token
                }),
            }
        };
        let id = &stored.record.id;
        self.journal
            .commit(vec![
                Op::PutMeta {
                    key: format!("{AGENT_PREFIX}{id}"),
                    value: encode(stored),
                },
                token_op,
            ])
            .await?;
        {
            let mut tokens = write(&self.tokens);
            if left == 0 {
                tokens.remove(hash);
            } else if let Some(t) = tokens.get_mut(hash) {
                t.uses_left = left;
            }
        }
        write(&self.agents).insert(stored.clone());
        Ok(left)
    }
}
