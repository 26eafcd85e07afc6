// The billing page's only script (R24, R25), loaded only when payments charges through
// Stripe. Card details are typed into Stripe's card element and go to Stripe.js; this
// page posts only the payment method id Stripe returns. A payment the bank wants
// confirmed is confirmed with Stripe.js, then the page asks payments to record it.
(function () {
  "use strict";
  var stripes = {};
  function stripeFor(key) {
    if (!stripes[key]) stripes[key] = Stripe(key);
    return stripes[key];
  }
  function say(node, text) {
    if (node) node.textContent = text;
  }

  var cardForm = document.getElementById("stripe-card-form");
  if (cardForm) {
    var stripe = stripeFor(cardForm.dataset.publishableKey);
    var card = stripe.elements().create("card");
    card.mount("#card-element");
    var busy = false;
    cardForm.addEventListener("submit", function (ev) {
      ev.preventDefault();
      if (busy) return;
      busy = true;
      say(document.getElementById("card-error"), "");
      stripe
        .confirmCardSetup(cardForm.dataset.clientSecret, { payment_method: { card: card } })
        .then(function (r) {
          if (r.error) {
            busy = false;
            say(document.getElementById("card-error"),
                r.error.message || "The card was not accepted. Check it and try again.");
            return;
          }
          var pm = r.setupIntent.payment_method;
          cardForm.elements.processor_token.value = typeof pm === "string" ? pm : pm.id;
          cardForm.submit();
        }, function () {
          busy = false;
          say(document.getElementById("card-error"), "The card form could not reach the card processor. Try again.");
        });
    });
  }

  var confirms = document.querySelectorAll("form.confirm-payment");
  Array.prototype.forEach.call(confirms, function (form) {
    var busy = false;
    form.addEventListener("submit", function (ev) {
      ev.preventDefault();
      if (busy) return;
      busy = true;
      var out = form.querySelector(".error");
      stripeFor(form.dataset.publishableKey)
        .confirmCardPayment(form.dataset.clientSecret)
        .then(function (r) {
          var status = r.paymentIntent && r.paymentIntent.status;
          if (r.error || (status !== "succeeded" && status !== "processing")) {
            busy = false;
            say(out, (r.error && r.error.message) || "The payment was not confirmed. You can try again.");
            return;
          }
          form.submit();
        }, function () {
          busy = false;
          say(out, "Could not reach the card processor. Try again.");
        });
    });
  });
})();
