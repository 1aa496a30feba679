//! The parser: recursive descent over the [`Lexer`]'s tokens, producing an [`Expr`] whose
//! literals are type-checked as they are read.

use super::eval::{Expr, Operand};
use super::lexer::{Lexer, Pos, Tok, Token};
use super::{
    NumberField, ParseError, TimeField, Value, PREDICATE_DEPTH_MAX, PREDICATE_IN_VALUES_MAX,
};

/// Recursive descent with one token of lookahead (`current`).
pub(super) struct Parser<'a> {
    lexer: Lexer<'a>,
    pub(super) current: Token<'a>,
    /// Open `(` and `not` levels; bounded by [`PREDICATE_DEPTH_MAX`].
    depth: usize,
}

impl<'a> Parser<'a> {
    pub(super) fn new(source: &'a str) -> Result<Parser<'a>, ParseError> {
        let mut lexer = Lexer::new(source);
        let current = lexer.next_token()?;
        Ok(Parser {
            lexer,
            current,
            depth: 0,
        })
    }

    /// Moves to the next token, returning the one just passed.
    fn advance(&mut self) -> Result<Token<'a>, ParseError> {
        let next = self.lexer.next_token()?;
        Ok(std::mem::replace(&mut self.current, next))
    }

    fn at_word(&self, word: &str) -> bool {
        matches!(self.current.tok, Tok::Word(w) if w == word)
    }

    /// An error at the current token, which isn't what was `expected`.
    pub(super) fn unexpected(&self, expected: &str) -> ParseError {
        let message = match self.current.tok {
            Tok::Eof => format!("unexpected end of input, expected {expected}"),
            _ => format!("expected {expected} but found {}", self.current.describe()),
        };
        ParseError::at(self.current.pos, message)
    }

    /// Consumes a punctuation token, or fails naming it.
    fn expect(&mut self, tok: Tok<'static>, name: &str) -> Result<(), ParseError> {
        if self.current.tok == tok {
            self.advance()?;
            Ok(())
        } else {
            Err(self.unexpected(name))
        }
    }

    /// Opens one nesting level at `pos`.
    fn enter(&mut self, pos: Pos) -> Result<(), ParseError> {
        self.depth += 1;
        if self.depth > PREDICATE_DEPTH_MAX {
            return Err(ParseError::at(
                pos,
                format!("nesting is deeper than the limit of {PREDICATE_DEPTH_MAX} levels"),
            ));
        }
        Ok(())
    }

    fn leave(&mut self) {
        self.depth -= 1;
    }

    pub(super) fn parse_or(&mut self) -> Result<Expr, ParseError> {
        let mut terms = vec![self.parse_and()?];
        while self.at_word("or") {
            self.advance()?;
            terms.push(self.parse_and()?);
        }
        Ok(Expr::any(terms))
    }

    fn parse_and(&mut self) -> Result<Expr, ParseError> {
        let mut terms = vec![self.parse_unary()?];
        while self.at_word("and") {
            self.advance()?;
            terms.push(self.parse_unary()?);
        }
        Ok(Expr::all(terms))
    }

    fn parse_unary(&mut self) -> Result<Expr, ParseError> {
        if !self.at_word("not") {
            return self.parse_primary();
        }
        let not = self.advance()?;
        self.enter(not.pos)?;
        let inner = self.parse_unary()?;
        self.leave();
        Ok(Expr::Not(Box::new(inner)))
    }

    fn parse_primary(&mut self) -> Result<Expr, ParseError> {
        let word = match self.current.tok {
            Tok::LParen => {
                let open = self.advance()?;
                self.enter(open.pos)?;
                let inner = self.parse_or()?;
                self.expect(Tok::RParen, "\")\"")?;
                self.leave();
                return Ok(inner);
            }
            Tok::Attr(name) => {
                self.advance()?;
                return self.parse_comparison(Operand::Attr(name.to_owned()));
            }
            Tok::Word(word) => word,
            _ => return Err(self.unexpected("a condition")),
        };
        let number = |field| Some(Operand::Number(field));
        let operand = match word {
            "has_tag" => return Ok(Expr::HasTag(self.parse_call_argument()?)),
            "channel" => return Ok(Expr::Channel(self.parse_call_argument()?)),
            "has_identity" => return Ok(Expr::HasIdentity(self.parse_call_argument()?)),
            "points" => number(NumberField::Points),
            "spend_365d" => number(NumberField::Spend365d),
            "total_spend" => number(NumberField::TotalSpend),
            "order_count" => number(NumberField::OrderCount),
            "tier" => Some(Operand::Tier),
            "days_since" => None,
            "and" | "or" | "in" | "true" | "false" => return Err(self.unexpected("a condition")),
            "attr" => {
                return Err(ParseError::at(
                    self.current.pos,
                    "expected \"attr.\" followed by an attribute name",
                ))
            }
            _ => {
                return Err(ParseError::at(
                    self.current.pos,
                    format!("unknown field \"{word}\""),
                ))
            }
        };
        let operand = match operand {
            Some(operand) => {
                self.advance()?;
                operand
            }
            None => Operand::DaysSince(self.parse_time_field()?),
        };
        self.parse_comparison(operand)
    }

    /// `"(" STRING ")"` after a call name (the current token).
    fn parse_call_argument(&mut self) -> Result<String, ParseError> {
        self.advance()?;
        self.expect(Tok::LParen, "\"(\"")?;
        let Tok::Str(argument) = &self.current.tok else {
            return Err(self.unexpected("a string"));
        };
        let argument = argument.clone();
        self.advance()?;
        self.expect(Tok::RParen, "\")\"")?;
        Ok(argument)
    }

    /// `"(" TIMEFIELD ")"` after `days_since` (the current token).
    fn parse_time_field(&mut self) -> Result<TimeField, ParseError> {
        const EXPECTED: &str =
            "last_order_at, first_order_at, created_at, last_seen(\"CHANNEL\") or last_order_on(\"CHANNEL\")";
        self.advance()?;
        self.expect(Tok::LParen, "\"(\"")?;
        let Tok::Word(name) = self.current.tok else {
            return Err(self.unexpected(&format!("a time field ({EXPECTED})")));
        };
        let field = match name {
            "last_seen" => TimeField::LastSeen(self.parse_call_argument()?),
            "last_order_on" => TimeField::LastOrderOn(self.parse_call_argument()?),
            _ => {
                let Some(field) = TimeField::from_name(name) else {
                    return Err(ParseError::at(
                        self.current.pos,
                        format!("unknown time field \"{name}\" (expected {EXPECTED})"),
                    ));
                };
                self.advance()?;
                field
            }
        };
        self.expect(Tok::RParen, "\")\"")?;
        Ok(field)
    }

    /// `OP value` or `in (values)` after an operand.
    fn parse_comparison(&mut self, operand: Operand) -> Result<Expr, ParseError> {
        if let Tok::Cmp(op) = self.current.tok {
            self.advance()?;
            let value = self.parse_value(&operand)?;
            return Ok(Expr::Compare { operand, op, value });
        }
        if !self.at_word("in") {
            return Err(self.unexpected("a comparison operator or \"in\""));
        }
        self.advance()?;
        self.expect(Tok::LParen, "\"(\"")?;
        if self.current.tok == Tok::RParen {
            return Err(ParseError::at(
                self.current.pos,
                "an \"in\" list needs at least one value",
            ));
        }
        let mut values = Vec::new();
        loop {
            if values.len() == PREDICATE_IN_VALUES_MAX {
                return Err(ParseError::at(
                    self.current.pos,
                    format!("an \"in\" list holds at most {PREDICATE_IN_VALUES_MAX} values"),
                ));
            }
            values.push(self.parse_value(&operand)?);
            match self.current.tok {
                Tok::Comma => {
                    self.advance()?;
                }
                Tok::RParen => {
                    self.advance()?;
                    return Ok(Expr::In { operand, values });
                }
                _ => return Err(self.unexpected("\",\" or \")\"")),
            }
        }
    }

    /// A literal, type-checked against the operand it is compared with.
    fn parse_value(&mut self, operand: &Operand) -> Result<Value, ParseError> {
        let value = match &self.current.tok {
            Tok::Number(number) => Value::Number(*number),
            Tok::Str(text) => Value::String(text.clone()),
            Tok::Word("true") => Value::Bool(true),
            Tok::Word("false") => Value::Bool(false),
            _ => return Err(self.unexpected("a value (a number, a string, true or false)")),
        };
        // Checked before advancing, so a type error is reported before any error further on.
        operand
            .check(&value)
            .map_err(|message| ParseError::at(self.current.pos, message))?;
        self.advance()?;
        Ok(value)
    }
}
