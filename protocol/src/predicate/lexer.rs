//! The lexer: splits a predicate source into [`Token`]s, each with its [`Pos`].

use rust_decimal::Decimal;

use super::eval::CmpOp;
use super::ParseError;
// The longest attribute name after `attr.`: the one an event may set.
use crate::event::ATTRIBUTE_NAME_BYTES_MAX;

/// A 1-based position in the source; the column counts characters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Pos {
    pub(super) line: u32,
    pub(super) column: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub(super) enum Tok<'a> {
    LParen,
    RParen,
    Comma,
    Cmp(CmpOp),
    /// An identifier or keyword.
    Word(&'a str),
    /// `attr.NAME`, holding the validated NAME.
    Attr(&'a str),
    Number(Decimal),
    /// A string literal, unescaped.
    Str(String),
    Eof,
}

#[derive(Debug, Clone)]
pub(super) struct Token<'a> {
    pub(super) tok: Tok<'a>,
    /// The token's source text, for error messages.
    text: &'a str,
    pub(super) pos: Pos,
}

impl Token<'_> {
    /// How the token is named in "but found ..." messages.
    pub(super) fn describe(&self) -> String {
        match self.tok {
            Tok::Eof => "end of input".to_owned(),
            Tok::Number(_) => format!("number {}", self.text),
            Tok::Str(_) => format!("string {}", self.text),
            _ => format!("\"{}\"", self.text),
        }
    }
}

/// Splits the source into tokens on demand, so that the first error in source order is the
/// one reported (a bad string at the end doesn't mask a bad field at the start).
pub(super) struct Lexer<'a> {
    source: &'a str,
    /// Byte offset of the next character.
    offset: usize,
    /// Position of the next character.
    pos: Pos,
}

impl<'a> Lexer<'a> {
    pub(super) fn new(source: &'a str) -> Lexer<'a> {
        Lexer {
            source,
            offset: 0,
            pos: Pos { line: 1, column: 1 },
        }
    }

    fn peek(&self) -> Option<char> {
        self.source[self.offset..].chars().next()
    }

    fn bump(&mut self) -> Option<char> {
        let c = self.peek()?;
        self.offset += c.len_utf8();
        // Sources are at most 4096 bytes, so these can't overflow; saturate anyway.
        if c == '\n' {
            self.pos.line = self.pos.line.saturating_add(1);
            self.pos.column = 1;
        } else {
            self.pos.column = self.pos.column.saturating_add(1);
        }
        Some(c)
    }

    fn eat(&mut self, expected: char) -> bool {
        if self.peek() == Some(expected) {
            self.bump();
            true
        } else {
            false
        }
    }

    fn eat_while(&mut self, accept: impl Fn(char) -> bool) {
        while self.peek().is_some_and(&accept) {
            self.bump();
        }
    }

    pub(super) fn next_token(&mut self) -> Result<Token<'a>, ParseError> {
        self.eat_while(char::is_whitespace);
        let start = self.offset;
        let pos = self.pos;
        let Some(c) = self.bump() else {
            return Ok(Token {
                tok: Tok::Eof,
                text: "",
                pos,
            });
        };
        let tok = match c {
            '(' => Tok::LParen,
            ')' => Tok::RParen,
            ',' => Tok::Comma,
            '=' if self.eat('=') => Tok::Cmp(CmpOp::Eq),
            '!' if self.eat('=') => Tok::Cmp(CmpOp::Ne),
            '<' if self.eat('=') => Tok::Cmp(CmpOp::Le),
            '<' => Tok::Cmp(CmpOp::Lt),
            '>' if self.eat('=') => Tok::Cmp(CmpOp::Ge),
            '>' => Tok::Cmp(CmpOp::Gt),
            '"' => self.string(pos)?,
            '0'..='9' => self.number(start, pos)?,
            '-' if self.peek().is_some_and(|c| c.is_ascii_digit()) => self.number(start, pos)?,
            c if c.is_ascii_alphabetic() || c == '_' => self.word(start, pos)?,
            // Hints for what people coming from other languages type.
            '=' => {
                return Err(ParseError::at(
                    pos,
                    "unexpected character \"=\" (compare with \"==\")",
                ))
            }
            '!' => {
                return Err(ParseError::at(
                    pos,
                    "unexpected character \"!\" (negate with \"not\")",
                ))
            }
            '&' => {
                return Err(ParseError::at(
                    pos,
                    "unexpected character \"&\" (use \"and\")",
                ))
            }
            '|' => {
                return Err(ParseError::at(
                    pos,
                    "unexpected character \"|\" (use \"or\")",
                ))
            }
            other => {
                return Err(ParseError::at(
                    pos,
                    format!("unexpected character \"{}\"", other.escape_debug()),
                ))
            }
        };
        Ok(Token {
            tok,
            text: &self.source[start..self.offset],
            pos,
        })
    }

    /// A string literal; the opening quote is consumed.
    fn string(&mut self, open: Pos) -> Result<Tok<'a>, ParseError> {
        let mut text = String::new();
        loop {
            let here = self.pos;
            match self.bump() {
                // A newline almost always means a forgotten closing quote; pointing at the
                // opening quote is more useful than at the end of the source.
                None | Some('\n') => return Err(ParseError::at(open, "unterminated string")),
                Some('"') => return Ok(Tok::Str(text)),
                Some('\\') => match self.bump() {
                    Some('"') => text.push('"'),
                    Some('\\') => text.push('\\'),
                    None | Some('\n') => return Err(ParseError::at(open, "unterminated string")),
                    Some(other) => {
                        return Err(ParseError::at(
                            here,
                            format!(
                            "invalid escape \"\\{}\" in string (only \\\" and \\\\ are allowed)",
                            other.escape_debug()
                        ),
                        ))
                    }
                },
                Some(c) => text.push(c),
            }
        }
    }

    /// A number literal; its first character (digit or `-`) is consumed.
    fn number(&mut self, start: usize, pos: Pos) -> Result<Tok<'a>, ParseError> {
        self.eat_while(|c| c.is_ascii_digit());
        let mut well_formed = true;
        if self.eat('.') {
            well_formed = self.peek().is_some_and(|c| c.is_ascii_digit());
            self.eat_while(|c| c.is_ascii_digit());
        }
        // `12abc`, `1.2.3`: report the whole run as one bad number rather than a number
        // followed by a puzzling second token.
        if self
            .peek()
            .is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '.')
        {
            well_formed = false;
            self.eat_while(|c| c.is_alphanumeric() || c == '_' || c == '.');
        }
        let text = &self.source[start..self.offset];
        if !well_formed {
            return Err(ParseError::at(pos, format!("invalid number \"{text}\"")));
        }
        // Exact: from the literal text, never through f64, and never silently rounded.
        Decimal::from_str_exact(text).map(Tok::Number).map_err(|_| {
            ParseError::at(
                pos,
                format!("number {text} is out of range (at most 28 significant digits)"),
            )
        })
    }

    /// An identifier, keyword or `attr.NAME`; its first character is consumed.
    fn word(&mut self, start: usize, pos: Pos) -> Result<Tok<'a>, ParseError> {
        self.eat_while(|c| c.is_ascii_alphanumeric() || c == '_');
        let word = &self.source[start..self.offset];
        if word != "attr" || !self.eat('.') {
            return Ok(Tok::Word(word));
        }
        let name_start = self.offset;
        // Take any alphanumerics so that `attr.Città` is reported whole.
        self.eat_while(|c| c.is_alphanumeric() || c == '_');
        let name = &self.source[name_start..self.offset];
        if name.is_empty() {
            return Err(ParseError::at(
                pos,
                "expected an attribute name after \"attr.\"",
            ));
        }
        let valid = name.len() <= ATTRIBUTE_NAME_BYTES_MAX
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if !valid {
            return Err(ParseError::at(
                pos,
                format!(
                    "invalid attribute name \"{name}\" (1 to {ATTRIBUTE_NAME_BYTES_MAX} of a-z, 0-9 and _)"
                ),
            ));
        }
        Ok(Tok::Attr(name))
    }
}
